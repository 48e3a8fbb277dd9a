"""gRPC front end: servicers, interceptors and the server itself."""
