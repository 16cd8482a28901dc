"""One image through one model: the value types, decoding and resizing, the batcher and its adaptive size, one
served model (ModelPipeline) and the front every door calls (SegmentationPipeline), masks and overlays, the
admission bound and the byte budgets of uploads and streams. Transport-free: no protobuf, no HTTP here."""
