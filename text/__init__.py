"""Text pieces every layer may import: the BPE tokenizer and the block-world corpus."""
