"""Vision track of strlowrank: STR (Kusupati et al., ICML 2020) on CNNs.

``vision.data`` builds datasets (the shipped Fashion-MNIST subset, ImageNet / any ImageFolder tree,
CIFAR-10), ``vision.models`` is the model registry (torchvision ResNets, a local MobileNetV1 and
small-image variants), ``vision.method`` applies the configured method (dense, STR, magnitude
pruning) to a model. Importing the package does nothing beyond imports.
"""
