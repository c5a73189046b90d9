#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A chunk of memory aligned for O_DIRECT (the device's logical block size, at least 4096),
/// carrying the device offset and length of the image bytes it holds.
///
/// Buffers move between exactly one producer and its consumers through `BufferPool` and
/// `ChunkQueue`, which provide the happens-before edges; that is why the class is
/// `@unchecked Sendable` rather than locked on every access.
public final class AlignedBuffer: @unchecked Sendable {
    public let capacity: Int
    public let alignment: Int
    public let bytes: UnsafeMutableRawPointer
    /// Device offset of the first byte.
    public var offset: UInt64 = 0
    /// Number of image bytes held (≤ capacity; may be unaligned at the very end of an image).
    public var count: Int = 0
    /// Fingerprint of the held bytes (compressed sources), taken from the stream for verification.
    var fingerprint: Fingerprint?

    public init(capacity: Int, alignment: Int) {
        precondition(capacity % alignment == 0, "capacity must be a multiple of the alignment")
        var p: UnsafeMutableRawPointer?
        let rc = posix_memalign(&p, alignment, capacity)
        guard rc == 0, let p else { fatalError("posix_memalign(\(alignment), \(capacity)) failed: \(rc)") }
        self.capacity = capacity
        self.alignment = alignment
        self.bytes = p
    }

    deinit { free(bytes) }

    public var buffer: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: bytes, count: count) }
}

/// A fixed set of buffers: the producer blocks when all are in flight, which is what keeps
/// memory flat whatever the image size (DESIGN.md §4).
public final class BufferPool: @unchecked Sendable {
    private let condition = NSCondition()
    private var free: [AlignedBuffer]
    private var closed = false
    public let bufferSize: Int
    public let count: Int

    public init(count: Int, bufferSize: Int, alignment: Int) {
        self.bufferSize = bufferSize
        self.count = count
        self.free = (0..<count).map { _ in AlignedBuffer(capacity: bufferSize, alignment: alignment) }
    }

    /// Takes a buffer, waiting for one to come back; nil once the pool is closed.
    public func acquire() -> AlignedBuffer? {
        condition.lock(); defer { condition.unlock() }
        while free.isEmpty && !closed { condition.wait() }
        if closed { return nil }
        let b = free.removeLast()
        b.count = 0
        b.offset = 0
        return b
    }

    public func release(_ buffer: AlignedBuffer) {
        condition.lock()
        free.append(buffer)
        condition.signal()
        condition.unlock()
    }

    /// Wakes every waiter with nil: used on cancel and on failure so no thread hangs.
    public func close() {
        condition.lock()
        closed = true
        condition.broadcast()
        condition.unlock()
    }
}

/// A bounded single-producer queue of filled buffers; `nil` from `take()` means end of stream.
final class ChunkQueue: @unchecked Sendable {
    private let condition = NSCondition()
    private var items: [AlignedBuffer] = []
    private var finished = false
    private var failure: Error?

    func put(_ buffer: AlignedBuffer) {
        condition.lock()
        items.append(buffer)
        condition.signal()
        condition.unlock()
    }

    func finish(error: Error? = nil) {
        condition.lock()
        finished = true
        if failure == nil { failure = error }
        condition.broadcast()
        condition.unlock()
    }

    /// The next buffer, nil at the end; throws the producer's error once the queue is drained
    /// up to the failure point.
    func take() throws -> AlignedBuffer? {
        condition.lock(); defer { condition.unlock() }
        while items.isEmpty && !finished { condition.wait() }
        if !items.isEmpty { return items.removeFirst() }
        if let failure { throw failure }
        return nil
    }
}
