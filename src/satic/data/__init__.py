"""Data: vocabulary, label files, feature stores, datasets and the built-in dataset."""
