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
    /// The reader waited for the source (a cache still being filled) before this chunk: the
    /// writer's wait for it says nothing about how many buffers the card needs.
    var sourceWasLate = false
    /// The budget this buffer's bytes are counted against while a card holds it (nil when
    /// it is not from a budget, or idle in one); set and cleared under the budget's lock.
    var budget: BufferBudget?

    public init(capacity: Int, alignment: Int) {
        precondition(capacity % alignment == 0, "capacity must be a multiple of the alignment")
        var p: UnsafeMutableRawPointer?
        let rc = posix_memalign(&p, alignment, capacity)
        guard rc == 0, let p else { fatalError("posix_memalign(\(alignment), \(capacity)) failed: \(rc)") }
        self.capacity = capacity
        self.alignment = alignment
        self.bytes = p
    }

    deinit {
        free(bytes)
        budget?.bufferFreed(capacity: capacity)
    }

    public var buffer: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: bytes, count: count) }
}

/// The buffers of one stage of one write: the producer blocks when all are in flight, which
/// is what keeps memory flat whatever the image size (DESIGN.md §4).
///
/// Two kinds. A fixed pool (`provision write`: one card, the process's own memory) makes its
/// buffers up front and keeps them. A pool on a station's `BufferBudget` holds nothing of
/// its own: each `acquire` takes a buffer from the budget and each `release` gives it back,
/// so a card holds only what is in flight. It holds at least one buffer (waiting in line
/// for it when the budget is spent) and more — up to `depth`, which the consumer raises with
/// `grow()` when it finds itself waiting for the producer — only when the budget has room
/// that no other card is waiting for.
public final class BufferPool: @unchecked Sendable {
    private let condition = NSCondition()
    private var free: [AlignedBuffer]
    private var closed = false
    public let bufferSize: Int
    public let count: Int
    private let alignment: Int
    private let budget: BufferBudget?
    /// Budget buffers this pool has out, and how many it may have.
    private var held = 0
    private var depth = 1
    /// Read by the budget while a taker waits (under the budget's lock, not this one).
    private let closedFlag = ClosedFlag()
    /// A cancelled write stops waiting for the budget (the budget looks at least every 0.1 s).
    private let cancellation: CancellationFlag?

    public init(count: Int, bufferSize: Int, alignment: Int) {
        self.bufferSize = bufferSize
        self.count = count
        self.alignment = alignment
        self.budget = nil
        self.cancellation = nil
        self.free = (0..<count).map { _ in AlignedBuffer(capacity: bufferSize, alignment: alignment) }
    }

    /// A pool drawing on `budget`: at most `maximum` buffers, one to begin with. `bufferSize`
    /// is cut to what the budget can hold at all.
    public init(budget: BufferBudget, maximum: Int, bufferSize: Int, alignment: Int, cancellation: CancellationFlag? = nil) {
        let fits = max(budget.limit / alignment, 1) * alignment
        self.bufferSize = min(bufferSize, fits)
        self.count = max(maximum, 1)
        self.alignment = alignment
        self.budget = budget
        self.cancellation = cancellation
        self.free = []
        budget.poolOpened()
    }

    deinit {
        if budget != nil { close() }
    }

    /// Takes a buffer, waiting for one to come back; nil once the pool is closed.
    public func acquire() -> AlignedBuffer? {
        guard let budget else {
            condition.lock(); defer { condition.unlock() }
            while free.isEmpty && !closed { condition.wait() }
            if closed { return nil }
            let b = free.removeLast()
            b.count = 0
            b.offset = 0
            b.sourceWasLate = false
            return b
        }
        condition.lock()
        var triedExtra = false
        while true {
            if closed { condition.unlock(); return nil }
            if held == 0 {
                // The one buffer a card needs to make progress: wait in line for it.
                held += 1
                condition.unlock()
                let (flag, cancellation) = (closedFlag, cancellation)
                if let b = budget.take(capacity: bufferSize, alignment: alignment, wait: true,
                                       stop: { flag.isSet || cancellation?.isCancelled == true }) { return b }
                condition.withLock { held -= 1 }
                return nil
            }
            if held < min(depth, count) && !triedExtra {
                triedExtra = true
                if let b = budget.take(capacity: bufferSize, alignment: alignment, wait: false, stop: { false }) {
                    held += 1
                    condition.unlock()
                    return b
                }
            }
            // Enough in flight, or no spare room: one of ours comes back after its chunk.
            condition.wait()
            triedExtra = false
        }
    }

    public func release(_ buffer: AlignedBuffer) {
        condition.lock()
        if let budget {
            held -= 1
            condition.signal()
            condition.unlock()
            budget.giveBack(buffer)
            return
        }
        free.append(buffer)
        condition.signal()
        condition.unlock()
    }

    /// The consumer waited for the producer: one more buffer in flight would have kept it
    /// busy (taken only when the budget has room no one else waits for).
    public func grow() {
        condition.lock()
        if depth < count { depth += 1 }
        condition.signal()
        condition.unlock()
    }

    /// How many buffers this pool may have in flight now (a budget pool's depth).
    public var inFlightLimit: Int { condition.withLock { budget == nil ? count : min(depth, count) } }

    /// Wakes every waiter with nil: used on cancel and on failure so no thread hangs.
    public func close() {
        condition.lock()
        let first = !closed
        closed = true
        closedFlag.set()
        condition.broadcast()
        condition.unlock()
        if first, let budget {
            budget.wake()
            budget.poolClosed()
        }
    }
}

/// A flag set once, readable without the pool's lock (the budget reads it under its own).
private final class ClosedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
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
