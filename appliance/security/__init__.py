"""The security perimeter of the gRPC server: PKI, scoped tokens, the auth/audit interceptor,
the hash-chained audit trail and signed artifacts."""
