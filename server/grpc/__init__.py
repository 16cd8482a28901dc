"""The gRPC port: the Segmenter and inference.GRPCInferenceService servicers, their converters (protobuf <->
the core and the inference domain), what every servicer does alike (deadlines, statuses) and the interceptor that
opens each call's access record. Never imports the HTTP port."""
