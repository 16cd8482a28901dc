"""segserve server: gRPC front end over a transport-free segmentation pipeline."""
