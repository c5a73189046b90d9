/// Raw bytes to place at a byte offset on the card after the image (a boot loader at 8 KiB,
/// say), written and verified with the image.
public struct RawBlob: Sendable, Equatable {
    public let name: String
    public let offset: UInt64
    public let bytes: [UInt8]

    public init(name: String, offset: UInt64, bytes: [UInt8]) {
        self.name = name
        self.offset = offset
        self.bytes = bytes
    }
}

/// Knobs of one write. The defaults are what an operator wants; the test hooks exist so the
/// tests can prove the verifier catches a card that lies.
public struct WriteOptions: @unchecked Sendable {
    /// Bytes per write; 4 MiB suits SD cards (their erase blocks are 4 MiB or smaller).
    public var chunkSize = 4 << 20
    /// Buffers in the ring between decompressor and writer. Memory = chunkSize × bufferCount.
    /// With a `budget`, the most this write may hold in flight (it starts with one).
    public var bufferCount = 4
    /// A station's budget for every card's buffers (issue 18): buffers are taken from it as
    /// they are needed and given back after each chunk. nil: this write's own fixed ring.
    public var budget: BufferBudget?
    public var verify = true
    /// One repair attempt when the read-back differs (issue 16): the chunk is written again
    /// and read back once more. Off, the first difference fails the write.
    public var repair = true
    /// Verify while writing: every `syncInterval` bytes the card is synced and what is now on
    /// it is read back by a second thread while the writer goes on. On an SD card the read
    /// path is idle while it writes, so most of the read-back hides behind the write; on a
    /// fast disk the hashing and comparing hide behind the I/O (a sync costs ~1–2 ms there).
    /// nil: verify everything after the final sync.
    public var syncInterval: UInt64? = 16 << 20
    /// The start of the image that is held back and written last, after everything else is
    /// synced: the partition table and the boot loader area before the first partition
    /// (partitions start at 1 MiB or later). Holding back only this much, not a whole chunk,
    /// keeps what is written and read back after the final sync small.
    public var headSize = 1 << 20
    public var bmap: Bmap?
    public var blobs: [RawBlob] = []
    public var cancellation = CancellationFlag()
    /// Called with the image's first chunk before anything is written (partition-table
    /// checks, e.g. that raw blobs do not overlap a partition). Throwing aborts the write.
    public var inspectFirstChunk: ((UnsafeRawBufferPointer) throws -> Void)?
    /// The source's mapped ranges were already checked against the bmap (a cache file whose
    /// filler checked them once for every card).
    public var sourceCheckedAgainstBmap = false
    /// Called after the target is opened and before its first byte is written: the caller's
    /// last chance to check the device is still the one the safety verdict was made for.
    public var beforeFirstWrite: ((WriteTarget) throws -> Void)?
    /// Called once, right before the first byte goes to the target: until then the write
    /// changed nothing on it (a caller that changed the card itself may undo that on failure).
    public var onFirstByte: (() -> Void)?
    /// Test-only: runs after the final sync and before verification.
    public var testHookBeforeVerify: ((WriteTarget) -> Void)?

    public init() {}
}

/// What a finished write did, for the CLI's summary, JSON output and the ledger.
public struct WriteResult: Sendable, Codable, Equatable {
    public var imageFormat: String
    /// Uncompressed image size (bmap ImageSize, or the bytes the stream held).
    public var imageSize: UInt64
    /// Bytes actually written to the device (mapped ranges and blobs).
    public var bytesWritten: UInt64
    public var bmapPath: String?
    public var verified: Bool
    public var writeSeconds: Double
    public var syncSeconds: Double
    public var verifySeconds: Double
    /// Where the read-back differed once and matched after one rewrite (the first differing
    /// byte of each repaired chunk); nil when nothing needed repair (issue 16).
    public var repairedAt: [UInt64]?
}

/// A written range and, for a compressed source, the fingerprint of the bytes that should be
/// there, taken from the stream as it went by, so verification needs no second decompression.
/// (Raw and cached sources are compared with the source file itself.)
struct WrittenChunk: Sendable {
    let offset: UInt64
    let count: Int
    let fingerprint: Fingerprint?
}
