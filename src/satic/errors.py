"""One exception type for problems a user can fix; the CLI prints it and exits non-zero."""
import re


class SaticError(Exception):
    """A user-facing error: the message names the file or option and how to fix it."""


def first_few(items, shown: int = 3, sep: str = ", ") -> str:
    """The first `shown` of `items` joined by `sep`, then how many more there are ("a, b, c and 4 more")."""
    items = [str(item) for item in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def counted(count: int, noun: str) -> str:
    """"1 iteration", "2 iterations", "1,000 images": a count with its noun in the right number."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def library_reason(err: BaseException, width: int = 160) -> str:
    """A library's exception as a short reason inside one of our messages: its type and the first sentence of its
    text, without terminal colour codes (torch's load errors carry them, and advice about torch.load after the
    first sentence), cut at `width` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    if text.startswith("Weights only load failed"):  # torch's advice, then the reason
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # torch < 2.6: on one line of the advice
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]  # torch >= 2.6: a paragraph of its own
        reason = unpickler.group(1) if unpickler else paragraphs[1] if len(paragraphs) > 2 else None
        text = f"weights-only loading refused it: {reason}" if reason else text
    first = re.split(r"(?<=\.)\s", text.splitlines()[0])[0].rstrip(".") if text else ""
    if len(first) > width:
        first = first[: width - 3].rstrip() + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__

