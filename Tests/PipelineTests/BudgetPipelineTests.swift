// Cards sharing one station buffer budget (issue 18): with a budget far too small for all of
// them at once, every card waits its turn for a buffer and is written, verified and done —
// none fails, none hangs — and the bytes handed out never pass the budget.

import Foundation
import ImageIO
import Pipeline
import Testing
import TestSupport

private func eventually(_ what: String, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(300)
    while !condition() {
        guard ContinuousClock.now < deadline else {
            Issue.record("timed out waiting until \(what)")
            return
        }
        try await Task.sleep(for: .milliseconds(5))
    }
}

private final class Outcomes: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [CardOutcome?]
    init(_ n: Int) { values = [CardOutcome?](repeating: nil, count: n) }
    func set(_ i: Int, _ outcome: CardOutcome) { lock.withLock { values[i] = outcome } }
    var all: [CardOutcome] { lock.withLock { values.map { $0! } } }
}

private struct NoSink: CardReportSink {
    func receive(_ report: CardReport) {}
}

@Suite("Cards on one buffer budget", .serialized)
struct BudgetPipelineTests {
    static let mib = 1 << 20

    @Test("five cards on a 2 MiB budget (1 MiB chunks) are all written and verified, raw and zstd, and the cap holds")
    func severalCardsOnATinyBudget() async throws {
        let directory = try TemporaryDirectory("provision-budget")
        defer { directory.remove() }
        let raw = directory.path + "/image.img"
        // 7 MiB and a bit: an unaligned end, and a first MiB that is held back and written last.
        try Command.check(["bash", "-c", "head -c \(7 * Self.mib + 5 * 512 + 100) /dev/urandom > \(raw)"])
        try Command.check(["zstd", "-q", "-f", raw, "-o", raw + ".zst"])
        let size = try #require(try FileManager.default.attributesOfItem(atPath: raw)[.size] as? Int)
        // The card is read back in whole sectors: past the image's end its last one keeps the
        // fresh card's zeros.
        let padded = (size + 511) / 512 * 512
        let expected = String(try Command.check(["bash", "-c", "{ cat \(raw); head -c \(padded - size) /dev/zero; } | sha256sum"]).stdout.prefix(64))

        let budget = BufferBudget(limit: 2 * Self.mib)
        let cards = try (0..<5).map { try LoopCard(label: "budget-\($0)", size: 16 << 20) }
        defer { for card in cards { card.close() } }
        let outcomes: [CardOutcome] = await offPool {
            let group = DispatchGroup()
            let outcomes = Outcomes(cards.count)
            for (i, card) in cards.enumerated() {
                group.enter()
                Thread {
                    defer { group.leave() }
                    var job = CardJob(image: i % 2 == 0 ? raw : raw + ".zst", target: card.devicePath, policy: nil)
                    job.bmap = .none
                    job.budget = budget
                    job.chunkSize = Self.mib
                    let outcome = CardPipeline(job: job, sink: NoSink()).run()
                    outcomes.set(i, outcome)
                }.start()
            }
            group.wait()
            return outcomes.all
        }
        for (i, outcome) in outcomes.enumerated() {
            guard case .done(let result) = outcome else {
                Issue.record("card \(i) did not end done on the shared budget: \(outcome)")
                continue
            }
            #expect(result.write.verified)
            #expect(try cards[i].sha256(bytes: Int64(padded)) == expected, "card \(i) holds the image")
        }
        let usage = budget.usage
        #expect(usage.peakAllocated <= 2 * Self.mib && usage.peakHandedOut <= 2 * Self.mib)
        #expect(usage.waits > 0, "five cards needed more than 2 MiB at once, so some waited")
        #expect(usage.handedOut == 0 && usage.allocated == 0 && usage.waiting == 0, "every buffer came back when the cards were done")
    }

    @Test("a card cancelled while it waits for a buffer ends cancelled, holding nothing")
    func cancelledWhileWaitingForTheBudget() async throws {
        let directory = try TemporaryDirectory("provision-budget")
        defer { directory.remove() }
        let raw = directory.path + "/image.img"
        try Command.check(["bash", "-c", "head -c \(4 * Self.mib) /dev/urandom > \(raw)"])
        let card = try LoopCard(label: "budget-cancel", size: 16 << 20)
        defer { card.close() }
        let budget = BufferBudget(limit: Self.mib)
        // Another card holds the whole budget.
        let other = BufferPool(budget: budget, maximum: 1, bufferSize: Self.mib, alignment: 4096)
        let held = try #require(other.acquire())

        var job = CardJob(image: raw, target: card.devicePath, policy: nil)
        job.bmap = .none
        job.budget = budget
        job.chunkSize = Self.mib
        let cancellation = CancellationFlag()
        let pipeline = CardPipeline(job: job, cancellation: cancellation, sink: NoSink())
        let running = Task { await offPool { pipeline.run() } }
        try await eventually("the card waits for a buffer") { budget.usage.waiting == 1 }
        cancellation.cancel()
        let outcome = await running.value
        guard case .cancelled = outcome else {
            Issue.record("expected cancelled, got \(outcome)")
            return
        }
        #expect(budget.usage.handedOut == Self.mib, "only the other card's buffer is out")
        other.release(held)
        other.close()
        #expect(budget.usage.handedOut == 0 && budget.usage.allocated == 0)
    }
}
