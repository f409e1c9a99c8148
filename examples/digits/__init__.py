"""scikit-learn digits (1797 8x8 images, bundled): small CNNs in Linen and NNX for
quantization experiments (PTQ, QAT, QLoRA). See :mod:`examples.digits.data`,
:mod:`examples.digits.models`, :mod:`examples.digits.train`."""
