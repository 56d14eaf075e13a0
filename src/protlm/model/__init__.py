"""The T5 architecture (torch only)."""

from protlm.model.t5 import T5, KVCache, Seq2SeqOutput, StackOutput

__all__ = ["T5", "KVCache", "Seq2SeqOutput", "StackOutput"]
