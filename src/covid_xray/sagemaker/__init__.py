"""Amazon SageMaker integration: inference handlers (`handlers`); the training entry point and the
launcher join them later."""
