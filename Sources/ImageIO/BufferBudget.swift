#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// The memory a whole station may spend on card buffers (issue 18), shared by every card's
/// write engine: buffers are taken from it one at a time as a card needs them and go back
/// to it as soon as a chunk is written or read back.
///
/// Why one budget and not so many buffers per card: with a fixed ring per card, memory grows
/// with the number of cards (32 cards × 6 buffers is ~200 MiB), and shrinking the rings to
/// stay under a limit made every card's chunks smaller whether the station was busy or not.
/// A card writing at 10 MB/s keeps a 1 MiB chunk in flight for 0.1 s and needs nothing more
/// to stay busy; what it does not hold, a faster card can use.
///
/// The limit is a real cap: `allocated` — every live buffer this budget made, handed out or
/// kept idle for reuse — never exceeds it. A taker that finds no room waits, in the order it
/// came (first come, first served, so no card starves), until a buffer comes back or its own
/// pool is closed. Nothing is ever refused: a card waits, and a buffer held by a writer or
/// a verifier always comes back after one chunk's I/O, which needs no further buffer, so the
/// waits end (no deadlock) as long as one buffer fits in the budget.
///
/// A buffer that is dropped instead of given back (a chunk left in a queue when a job is
/// cancelled) returns its bytes to the budget when it is freed (`AlignedBuffer.deinit`), so
/// the accounting holds on every ending, not only on the ones that remember to give back.
public final class BufferBudget: @unchecked Sendable {
    /// Guards everything below. Waiters sleep on their own semaphores, not on a condition of
    /// this lock: a buffer coming back wakes the one taker first in line, not all of them
    /// (32 cards waiting in line were woken twice for every chunk of every card, ~20,000
    /// times a batch each, to find they were not first).
    private let condition = NSLock()
    private var limitBytes: Int
    /// Bytes of live buffers made by this budget: handed out plus idle.
    private var allocated = 0
    /// Bytes handed out now, and the most ever handed out at once.
    private var handedOut = 0
    private var peakHandedOut = 0
    private var peakAllocated = 0
    /// Buffers given back, kept for the next taker: reusing them saves the kernel zeroing
    /// fresh pages for every chunk (a 1 MiB buffer is 256 page faults). Freed when no pool
    /// is open, so an idle station holds none.
    private var idle: [AlignedBuffer] = []
    private var openPools = 0
    /// Takers waiting for room, in arrival order; only the first may take.
    private var queue: [Waiter] = []
    private var waits = 0
    private var wakeups = 0

    public init(limit: Int) {
        precondition(limit > 0, "a buffer budget needs room for at least one buffer")
        self.limitBytes = limit
    }

    /// The cap in bytes. Lowering it (a reload) takes effect as buffers come back: nothing
    /// new is made until the budget is under the new cap. A card whose buffers are larger
    /// than the new cap itself gets one at a time, when nothing else is allocated (`obtain`).
    public var limit: Int {
        get { condition.withLock { limitBytes } }
        set {
            condition.lock()
            limitBytes = max(newValue, 1)
            let dropped = trimIdle(toFit: 0)
            wakeFirst()
            condition.unlock()
            _ = dropped  // freed here, outside the lock
        }
    }

    /// What the budget holds now and has held at most.
    public struct Usage: Sendable, Equatable {
        public var limit: Int
        /// Bytes in buffers that cards hold now.
        public var handedOut: Int
        public var peakHandedOut: Int
        /// Bytes of every live buffer made from the budget (handed out or idle): never above `limit`.
        public var allocated: Int
        public var peakAllocated: Int
        /// Takers waiting for room now, and how many times any taker had to wait.
        public var waiting: Int
        public var waits: Int
        /// How many times a waiting taker was woken to look again (timeouts aside).
        public var wakeups: Int
    }

    public var usage: Usage {
        condition.withLock {
            Usage(limit: limitBytes, handedOut: handedOut, peakHandedOut: peakHandedOut, allocated: allocated,
                  peakAllocated: peakAllocated, waiting: queue.count, waits: waits, wakeups: wakeups)
        }
    }

    // MARK: - For BufferPool

    /// A buffer of `capacity` bytes aligned to at least `alignment`. With `wait`, blocks in
    /// arrival order until there is room or `stop()` turns true (nil then); without, returns
    /// nil at once when anyone is waiting or there is no room (a card's extra buffer is only
    /// ever taken when it costs nobody anything).
    func take(capacity: Int, alignment: Int, wait: Bool, stop: @escaping () -> Bool) -> AlignedBuffer? {
        condition.lock()
        if !wait {
            let buffer = queue.isEmpty ? obtain(capacity: capacity, alignment: alignment) : nil
            condition.unlock()
            return buffer
        }
        let me = Waiter(stop: stop)
        queue.append(me)
        var waited = false
        defer {
            queue.removeAll { $0 === me }
            // The next in line may fit now (or may be the one whose pool closed).
            wakeFirst()
            condition.unlock()
        }
        while true {
            if stop() { return nil }
            if queue.first === me, let buffer = obtain(capacity: capacity, alignment: alignment) { return buffer }
            if !waited { waited = true; waits += 1 }
            // Timed: a cancelled write is noticed even when no buffer comes back meanwhile.
            condition.unlock()
            let woken = me.semaphore.wait(timeout: .now() + .milliseconds(100)) == .success
            condition.lock()
            if woken { wakeups += 1 }
        }
    }

    /// A taker in line; its semaphore is signalled when it may find room (it looks again
    /// under the lock, so a signal too many only costs one look).
    private final class Waiter: @unchecked Sendable {
        let semaphore = DispatchSemaphore(value: 0)
        /// Its pool closed or its write was cancelled (read without the budget's lock's help:
        /// the flags have their own).
        let stop: () -> Bool
        init(stop: @escaping () -> Bool) { self.stop = stop }
    }

    /// Under the lock: wakes the first taker in line.
    private func wakeFirst() {
        queue.first?.semaphore.signal()
    }

    /// Takes the buffer back for reuse.
    func giveBack(_ buffer: AlignedBuffer) {
        condition.lock()
        if buffer.budget === self {
            buffer.budget = nil  // idle: counted in `allocated`, not handed out
            handedOut -= buffer.capacity
            idle.append(buffer)
        }
        let dropped = openPools == 0 ? drainIdle() : trimIdle(toFit: 0)
        wakeFirst()
        condition.unlock()
        _ = dropped
    }

    /// Wakes the waiters whose pool was closed (or whose write was cancelled), so that they
    /// stop waiting now rather than at their next timeout.
    func wake() {
        condition.lock()
        for waiter in queue where waiter.stop() { waiter.semaphore.signal() }
        condition.unlock()
    }

    func poolOpened() {
        condition.withLock { openPools += 1 }
    }

    /// The last pool closing frees the idle buffers: a station with no card running holds
    /// no buffer memory.
    func poolClosed() {
        condition.lock()
        openPools -= 1
        let dropped = openPools == 0 ? drainIdle() : []
        wakeFirst()
        condition.unlock()
        _ = dropped
    }

    /// A handed-out buffer was freed without being given back (`AlignedBuffer.deinit`).
    func bufferFreed(capacity: Int) {
        condition.lock()
        handedOut -= capacity
        allocated -= capacity
        wakeFirst()
        condition.unlock()
    }

    // MARK: - Under the lock

    private func obtain(capacity: Int, alignment: Int) -> AlignedBuffer? {
        if let i = idle.lastIndex(where: { $0.capacity == capacity && $0.alignment % alignment == 0 }) {
            let buffer = idle.remove(at: i)
            return handOut(buffer)
        }
        if allocated + capacity > limitBytes {
            // Idle buffers of another size (or alignment) make room for this one.
            let idleBytes = idle.reduce(0, { $0 + $1.capacity })
            // A buffer larger than the whole cap (a card's pool made before a reload lowered
            // it) is made once nothing else is allocated: one buffer over the cap for as long
            // as that card runs, instead of a card, and every card in line behind it, that
            // can never go on.
            let oversizeAlone = capacity > limitBytes && allocated == idleBytes
            guard idleBytes >= allocated + capacity - limitBytes || oversizeAlone else { return nil }
            let dropped = oversizeAlone ? drainIdle() : trimIdle(toFit: capacity)
            _ = dropped  // freed when this returns: their `budget` is nil, so no call back in
        }
        let buffer = AlignedBuffer(capacity: capacity, alignment: max(alignment, 4096))
        allocated += capacity
        peakAllocated = max(peakAllocated, allocated)
        return handOut(buffer)
    }

    private func handOut(_ buffer: AlignedBuffer) -> AlignedBuffer {
        buffer.budget = self
        buffer.count = 0
        buffer.offset = 0
        buffer.fingerprint = nil
        buffer.sourceWasLate = false
        handedOut += buffer.capacity
        peakHandedOut = max(peakHandedOut, handedOut)
        return buffer
    }

    /// Removes idle buffers until `extra` more bytes fit under the limit; the caller drops
    /// the returned buffers outside the lock.
    private func trimIdle(toFit extra: Int) -> [AlignedBuffer] {
        var dropped: [AlignedBuffer] = []
        while allocated + extra > limitBytes, let buffer = idle.popLast() {
            allocated -= buffer.capacity
            dropped.append(buffer)
        }
        return dropped
    }

    private func drainIdle() -> [AlignedBuffer] {
        let dropped = idle
        idle = []
        allocated -= dropped.reduce(0) { $0 + $1.capacity }
        return dropped
    }
}
