"""fuseformer.models: reference models built on fuseformer's kernels (``backend="fuseformer"``)
or on plain PyTorch (``backend="torch"``), with identical state_dict keys."""

from fuseformer.models.cnn import ResNet, ResNetConfig, synthetic_images
from fuseformer.models.data import ByteTokenizer, synthetic_corpus, text_batches
from fuseformer.models.rnn import LSTMClassifier, LSTMConfig, LSTMLanguageModel, synthetic_sequences
from fuseformer.models.transformer import BERT, GPT, BERTConfig, GPTConfig, KVCache

__all__ = ["BERT", "BERTConfig", "ByteTokenizer", "GPT", "GPTConfig", "KVCache", "LSTMClassifier", "LSTMConfig",
           "LSTMLanguageModel", "ResNet", "ResNetConfig", "synthetic_corpus", "synthetic_images",
           "synthetic_sequences", "text_batches"]
