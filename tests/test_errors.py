"""Library exceptions as short reasons inside satic's messages."""
import io
import os
import pickle

import pytest
import torch

from satic.errors import counted, first_few, library_reason

# torch.load(weights_only=True) of a pickle that calls os.getpid, as torch 2.4 words the refusal
TORCH_2_4_REFUSAL = (
    "Weights only load failed. This file can still be loaded, to do so you have two options \n\t(1) Re-running "
    "`torch.load` with `weights_only` set to `False` will likely succeed, but it can result in arbitrary code "
    "execution. Do it only if you got the file from a trusted source.\n\t(2) Alternatively, to load with "
    "`weights_only=True` please check the recommended steps in the following error message.\n\tWeightsUnpickler "
    "error: Unsupported global: GLOBAL posix.getpid was not an allowed global by default. Please use "
    "`torch.serialization.add_safe_globals([getpid])` to allowlist this global if you trust this class/function.\n\n"
    "Check the documentation of torch.load to learn more about types accepted by default with weights_only "
    "https://pytorch.org/docs/stable/generated/torch.load.html.")


class _RunsCode:
    def __reduce__(self):
        return os.getpid, ()


def test_a_weights_only_refusal_keeps_torchs_reason_not_its_advice():
    buf = io.BytesIO()
    torch.save({"a": _RunsCode()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(buf, weights_only=True)
    reason = library_reason(info.value)  # the installed torch's wording
    assert reason.startswith("UnpicklingError: weights-only loading refused it: "), reason
    assert "getpid" in reason and "trusted source" not in reason, reason
    assert library_reason(pickle.UnpicklingError(TORCH_2_4_REFUSAL)) == (
        "UnpicklingError: weights-only loading refused it: Unsupported global: GLOBAL posix.getpid was not an allowed "
        "global by default")


def test_a_reason_is_its_first_sentence_without_colours_cut_to_width():
    coloured = OSError("\x1b[31mUnable to open file.\x1b[0m Check it. More")
    assert library_reason(coloured) == "OSError: Unable to open file"
    assert library_reason(ValueError("x" * 200), width=20) == "ValueError: " + "x" * 17 + "..."
    assert library_reason(KeyError()) == "KeyError"
    assert library_reason(ValueError("x" * 20), width=20) == "ValueError: " + "x" * 20
    assert library_reason(ValueError("x" * 160)) == "ValueError: " + "x" * 160
    assert library_reason(ValueError("x" * 161)) == "ValueError: " + "x" * 157 + "..."


def test_only_torchs_weights_only_refusal_is_read_for_its_reason():
    """A reason paragraph is looked for only in torch's weights-only refusal, and only between its advice and its
    pointer to the documentation."""
    assert library_reason(ValueError("First part. More.\n\nsecond\n\nthird")) == "ValueError: First part"
    assert library_reason(pickle.UnpicklingError("Weights only load failed. Advice.\n\nCheck the documentation.")) \
        == "UnpicklingError: Weights only load failed"
    assert library_reason(pickle.UnpicklingError("Weights only load failed. Advice.\n\nUnsupported global: x\n\n"
                                                 "Check the documentation.")) \
        == "UnpicklingError: weights-only loading refused it: Unsupported global: x"


@pytest.mark.parametrize("count, noun, expected", [(1, "iteration", "1 iteration"), (0, "epoch", "0 epochs"),
                                                   (2, "val image", "2 val images"), (12000, "image", "12,000 images")])
def test_counted_puts_the_noun_in_the_counts_number(count, noun, expected):
    assert counted(count, noun) == expected


@pytest.mark.parametrize("items, options, expected", [
    (["a", "b", "c"], {}, "a, b, c"),
    (range(5), {}, "0, 1, 2 and 2 more"),
    ([1, 2, 3], {"shown": 1, "sep": "; "}, "1 and 2 more"),
    ([1, 2], {"sep": "; "}, "1; 2"),
    ([], {}, ""),
])
def test_first_few_shows_the_first_items_then_how_many_more(items, options, expected):
    assert first_few(items, **options) == expected
