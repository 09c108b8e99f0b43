"""Training, evaluation and export for cifar-recipes (the CIFAR models live in `cifar_models`)."""
