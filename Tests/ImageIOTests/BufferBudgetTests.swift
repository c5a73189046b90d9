// The station's buffer budget (issue 18): a real cap on the bytes handed out, takers that
// wait in line and never fail, and bytes that come back on every ending.

import Foundation
@testable import ImageIO
import Testing
import TestSupport

/// Polls `condition` until it holds; a generous ceiling that only matters on failure.
private func eventually(_ what: String, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(300)
    while !condition() {
        guard ContinuousClock.now < deadline else { throw FixtureError("timed out waiting until \(what)") }
        try await Task.sleep(for: .milliseconds(5))
    }
}

/// Runs `body` on a thread of its own (it blocks); `value()` awaits its result.
private final class Taker<T: Sendable>: @unchecked Sendable {
    private let finished = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var result: T?
    init(_ body: @escaping @Sendable () -> T) {
        Thread { [self] in
            let value = body()
            lock.withLock { result = value }
            finished.signal()
        }.start()
    }
    var isDone: Bool { lock.withLock { result != nil } }
    func value() async -> T {
        await offPool { [self] in
            finished.wait()
            finished.signal()
            return lock.withLock { result! }
        }
    }
}

/// Bytes the test's takers hold, counted by them: a count independent of the budget's.
private final class HeldBytes: @unchecked Sendable {
    private let lock = NSLock()
    private var now = 0
    private(set) var peak = 0
    func add(_ n: Int) { lock.withLock { now += n; peak = max(peak, now) } }
    func remove(_ n: Int) { lock.withLock { now -= n } }
    var peakBytes: Int { lock.withLock { peak } }
}

private final class Counts: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Int]
    init(_ n: Int) { values = [Int](repeating: 0, count: n) }
    func bump(_ i: Int) { lock.withLock { values[i] += 1 } }
    var all: [Int] { lock.withLock { values } }
}

@Suite("Buffer budget")
struct BufferBudgetTests {
    static let mib = 1 << 20

    @Test("a buffer coming back wakes the taker first in line, not every taker waiting")
    func aReturnedBufferWakesOnlyTheFirstInLine() async throws {
        let budget = BufferBudget(limit: Self.mib)
        let holder = BufferPool(budget: budget, maximum: 1, bufferSize: Self.mib, alignment: 4096)
        let first = try #require(holder.acquire())
        // 16 cards in line for the one buffer; each takes it, and gives it back at once.
        let takers = 16
        let served = Counts(takers)
        let done = (0..<takers).map { i in
            Taker {
                let pool = BufferPool(budget: budget, maximum: 1, bufferSize: Self.mib, alignment: 4096)
                defer { pool.close() }
                guard let b = pool.acquire() else { return false }
                served.bump(i)
                pool.release(b)
                return true
            }
        }
        try await eventually("all 16 wait in line") { budget.usage.waiting == takers }
        holder.release(first)
        for taker in done { #expect(await taker.value()) }
        #expect(served.all == [Int](repeating: 1, count: takers))
        // Each buffer given back wakes one taker, and each take wakes the next in line to look:
        // about two wake-ups a taker. Waking every waiter each time would be ~16 × 16 / 2.
        let usage = budget.usage
        #expect(usage.wakeups <= 3 * takers, "\(usage.wakeups) wake-ups for \(takers) takers")
        #expect(usage.waiting == 0 && usage.handedOut == 0)
        holder.close()
    }

    @Test("the bytes handed out never exceed the budget, with 8 concurrent cards asking for more than it holds")
    func capHoldsUnderConcurrentTakers() async throws {
        let limit = 5 * Self.mib
        let budget = BufferBudget(limit: limit)
        // Counted by the takers themselves, not by the budget: a second, independent count.
        let held = HeldBytes()
        let chunks = 150
        // Each "card" is what a write is: a producer thread that acquires and fills buffers and
        // a consumer thread that "writes" them and releases them (a card's reader and writer).
        let outcomes: [Int] = await offPool {
            let group = DispatchGroup()
            let consumed = Counts(8)
            for card in 0..<8 {
                let pool = BufferPool(budget: budget, maximum: 3, bufferSize: Self.mib, alignment: 4096)
                // Half the cards ask for depth: they take extra buffers whenever there is room.
                if card % 2 == 0 { pool.grow(); pool.grow() }
                let queue = ChunkQueue()
                group.enter()
                Thread {
                    for _ in 0..<chunks {
                        guard let b = pool.acquire() else { break }
                        held.add(b.capacity)
                        memset(b.bytes, Int32(card), b.capacity)  // really use the memory
                        queue.put(b)
                    }
                    queue.finish()
                }.start()
                Thread {
                    defer { group.leave() }
                    while let b = try? queue.take() {
                        if card % 3 == 0 { usleep(200) }  // a slower card
                        consumed.bump(card)
                        held.remove(b.capacity)
                        pool.release(b)
                    }
                    pool.close()
                }.start()
            }
            group.wait()
            return consumed.all
        }
        #expect(outcomes == [Int](repeating: chunks, count: 8), "every card got every buffer it asked for: none failed, none hung")
        let usage = budget.usage
        #expect(held.peakBytes <= limit, "the takers never held more than the limit")
        #expect(usage.peakHandedOut <= limit && usage.peakAllocated <= limit)
        #expect(held.peakBytes <= usage.peakHandedOut, "the budget's own count saw at least what the takers held")
        #expect(usage.waits > 0, "the cards asked for more than the budget holds, so some had to wait")
        #expect(usage.handedOut == 0 && usage.allocated == 0, "every byte came back, and the idle buffers went with the last pool")
    }

    @Test("a taker waits in line when the budget is spent, gets the first buffer that comes back, and a closed pool stops waiting")
    func waitsForABufferAndStopsWhenClosed() async throws {
        let budget = BufferBudget(limit: Self.mib)
        let first = BufferPool(budget: budget, maximum: 4, bufferSize: Self.mib, alignment: 4096)
        var held: AlignedBuffer? = try #require(first.acquire())
        #expect(budget.usage.handedOut == Self.mib)

        let second = BufferPool(budget: budget, maximum: 4, bufferSize: Self.mib, alignment: 4096)
        let waiter = Taker { second.acquire() != nil }
        try await eventually("the second pool waits for room") { budget.usage.waiting == 1 }
        #expect(!waiter.isDone)
        first.release(held!)
        held = nil  // the same memory now belongs to the waiter
        #expect(await waiter.value(), "the buffer given back went to the waiting taker")
        // The waiter dropped it without giving it back: its bytes came back when it was freed.
        #expect(budget.usage.handedOut == 0 && budget.usage.allocated == 0)
        // (A dropped buffer still counts as the pool's own until the pool closes: only a
        // write's ending drops buffers, and it closes its pools.)
        second.close()
        let third = BufferPool(budget: budget, maximum: 1, bufferSize: Self.mib, alignment: 4096)
        let thirds = try #require(third.acquire())

        // The first pool asks again; the budget is spent, and closing it (a cancelled job)
        // ends the wait with nil instead of a hang.
        let again = Taker { first.acquire() == nil }
        try await eventually("the first pool waits again") { budget.usage.waiting == 1 }
        first.close()
        #expect(await again.value(), "a closed pool's taker gets nil")
        #expect(budget.usage.waiting == 0)
        third.release(thirds)
        third.close()
        #expect(budget.usage.handedOut == 0 && budget.usage.allocated == 0)
    }

    @Test("an extra buffer is taken only when nobody waits and there is room")
    func extraBuffersOnlyFromSpareRoom() throws {
        let budget = BufferBudget(limit: 2 * Self.mib)
        let fast = BufferPool(budget: budget, maximum: 4, bufferSize: Self.mib, alignment: 4096)
        defer { fast.close() }
        fast.grow(); fast.grow(); fast.grow()
        #expect(fast.inFlightLimit == 4)
        let a = try #require(fast.acquire())
        let b = try #require(fast.acquire())
        #expect(budget.usage.handedOut == 2 * Self.mib)
        // A third would wait for one of its own (the budget is full): hand one back first.
        fast.release(a)
        let c = try #require(fast.acquire())
        #expect(budget.usage.peakHandedOut == 2 * Self.mib)
        fast.release(b)
        fast.release(c)
        #expect(budget.usage.handedOut == 0)
    }

    @Test("a buffer dropped without being given back returns its bytes when it is freed")
    func droppedBufferReturnsItsBytes() throws {
        let budget = BufferBudget(limit: 3 * Self.mib)
        let pool = BufferPool(budget: budget, maximum: 2, bufferSize: Self.mib, alignment: 4096)
        pool.grow()
        var kept: AlignedBuffer? = try #require(pool.acquire())
        let given = try #require(pool.acquire())
        pool.release(given)
        #expect(budget.usage.handedOut == Self.mib && budget.usage.allocated == 2 * Self.mib)
        kept = nil  // a chunk left in a queue when a write is cancelled
        _ = kept
        #expect(budget.usage.handedOut == 0 && budget.usage.allocated == Self.mib)
        pool.close()
        #expect(budget.usage.allocated == 0, "the last pool closed: idle buffers are freed")
    }

    @Test("a buffer larger than the whole budget is cut to fit, so a card can always start")
    func bufferSizeFitsTheBudget() throws {
        let budget = BufferBudget(limit: Self.mib + 5000)
        let pool = BufferPool(budget: budget, maximum: 2, bufferSize: 4 * Self.mib, alignment: 4096)
        defer { pool.close() }
        #expect(pool.bufferSize == Self.mib + 4096)
        let b = try #require(pool.acquire())
        #expect(b.capacity == Self.mib + 4096 && Int(bitPattern: b.bytes) % 4096 == 0)
        pool.release(b)
    }

    @Test("lowering the limit frees idle buffers and makes nothing new until the budget is under it")
    func lowerLimitApplies() async throws {
        let budget = BufferBudget(limit: 4 * Self.mib)
        let pool = BufferPool(budget: budget, maximum: 4, bufferSize: Self.mib, alignment: 4096)
        defer { pool.close() }
        pool.grow(); pool.grow(); pool.grow()
        let held = (0..<3).compactMap { _ in pool.acquire() }
        #expect(held.count == 3)
        pool.release(held[2])
        budget.limit = 2 * Self.mib
        #expect(budget.usage.allocated == 2 * Self.mib, "the idle buffer went")
        let other = BufferPool(budget: budget, maximum: 1, bufferSize: Self.mib, alignment: 4096)
        let waiter = Taker { other.acquire() != nil }
        try await eventually("a new taker waits: 2 MiB are out, the cap is 2 MiB") { budget.usage.waiting == 1 }
        pool.release(held[0])
        #expect(await waiter.value())
        other.close()
        pool.release(held[1])
        #expect(budget.usage.peakAllocated <= 4 * Self.mib)
    }

    @Test("a cap lowered below a running card's buffer size: that card goes on one buffer at a time, alone over the cap, and the takers behind it are not stuck")
    func capBelowARunningPoolsBuffer() async throws {
        let budget = BufferBudget(limit: 16 * Self.mib)
        let big = BufferPool(budget: budget, maximum: 4, bufferSize: 4 * Self.mib, alignment: 4096)
        defer { big.close() }
        let first = try #require(big.acquire())
        budget.limit = 2 * Self.mib   // a reload: below the 4 MiB this card's pool makes
        big.release(first)
        #expect(budget.usage.allocated == 0, "the idle 4 MiB buffer went: it is above the new cap")
        // The card takes its next buffer: nothing else is out, so it gets one, over the cap.
        // (On a thread: before the fix it waited for good.)
        let taking = Taker { big.acquire() }
        try await eventually("the big card gets its next buffer") { taking.isDone }
        guard taking.isDone, let again = await taking.value() else { return }
        #expect(budget.usage.allocated == 4 * Self.mib)
        // A card of the new size waits while the big buffer is out, and gets its turn after.
        let small = BufferPool(budget: budget, maximum: 2, bufferSize: Self.mib, alignment: 4096)
        defer { small.close() }
        let waiter = Taker { () -> Bool in
            guard let b = small.acquire() else { return false }
            small.release(b)
            return true
        }
        try await eventually("the 1 MiB taker waits behind the big buffer") { budget.usage.waiting == 1 }
        big.release(again)
        #expect(await waiter.value(), "the line moves once the big buffer is back")
        #expect(budget.usage.allocated <= 2 * Self.mib, "the new cap binds everyone else")
        // The big card asks again while the small one holds 1 MiB: it waits (it is over the
        // cap only when alone), and goes on when the small card is done.
        let held = try #require(small.acquire())
        let bigWaiter = Taker { big.acquire() != nil }
        try await eventually("the big taker waits while anything else is out") { budget.usage.waiting == 1 }
        small.release(held)
        small.close()
        #expect(await bigWaiter.value())
    }
}
