import Testing

/// The real provisiond and provision binaries against the real udevd and loop cards
/// (issue 3, points 10–11). One test at a time: each starts its own daemon, but they share
/// udevd and the blkio throttles, and their timings are part of what they check.
@Suite("provisiond integration", .serialized)
struct IntegrationTests {}
