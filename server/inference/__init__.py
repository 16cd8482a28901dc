"""The Open Inference Protocol without a transport: the models' tensor contract, metadata, configuration and
statistics, and inference over the core; tensors as shapes, datatypes and bytes. Both doors convert to and from it."""
