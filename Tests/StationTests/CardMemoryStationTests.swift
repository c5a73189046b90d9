// Cards remembered (issue 16), the station's side: a job's verdict on its card goes into
// the ledger before the job's end is announced, and the next job for that card is refused
// on sight with the date and reason, until the card is forgotten.

import BlockDevices
import ControlProtocol
import Foundation
@testable import ImageIO
import Pipeline
@testable import Station
import Testing
import TestSupport

@Suite("Cards remembered in the station", .serialized)
struct CardMemoryStationTests {
    let base = CardJobStationTests()
    let card = CardIdentity(id: "rd-00112233aabbccdd", strength: .reader, detail: "reader serial none, 8388608 bytes, first sectors as found")

    @Test("a counterfeit verdict is in the ledger when the job's end is announced, and refuses the card on sight until forgotten")
    func counterfeitIsRememberedAndRefused() async throws {
        let f = try await base.fixture()
        defer { f.card.close() }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await base.nextStarted(f.runner)
        #expect(started.job.knownCard?(card) == nil, "an unknown card is not refused")
        var failure = CardFailure(.refused, "card claims 64.0 GB but stores about 8.0 GB: refused as counterfeit (/dev/loop9)")
        failure.card = card
        failure.verdict = .counterfeit
        started.reports.yield(.finished(.failed(failure)))
        started.reports.finish()
        let job = try #require(try await base.jobEventsUntilFinal(events).last)
        #expect(job.state == .failed && job.message == failure.message)

        let ledger = try Ledger(path: f.ledgerPath)
        let cards = try await ledger.cards()
        #expect(cards.map(\.id) == [card.id])
        #expect(cards.first?.verdict == "counterfeit" && cards.first?.refused == true && cards.first?.lastJob == job.id)
        let refusal = try #require(started.job.knownCard?(card))
        let today = ISO8601DateFormatter.string(from: Date(), timeZone: TimeZone(identifier: "UTC")!, formatOptions: [.withFullDate])
        #expect(refusal.hasPrefix("refusing card \(card.id): found counterfeit on \(today)"), "\(refusal)")
        #expect(refusal.contains("refused as counterfeit") && refusal.contains("provision cards forget \(card.id)"))

        // A later good verdict (it cannot come, the card is refused first) would not clear it.
        try await ledger.rememberCard(id: card.id, strength: "reader", detail: card.detail, verdict: "good", reason: nil, job: nil)
        #expect(try ledger.cardRefusal(id: card.id) != nil)
        #expect(try await ledger.forgetCard(id: card.id))
        #expect(started.job.knownCard?(card) == nil)
        #expect(try await ledger.forgetCard(id: card.id) == false)
    }

    @Test("a repaired card is remembered with its repair and speed, and not refused")
    func repairedIsRememberedNotRefused() async throws {
        let f = try await base.fixture()
        defer { f.card.close() }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await base.nextStarted(f.runner)
        var result = CardResult(write: WriteResult(imageFormat: "raw", imageSize: 1 << 20, bytesWritten: 1 << 20, bmapPath: nil,
                                                   verified: true, writeSeconds: 0.5, syncSeconds: 0, verifySeconds: 0.1,
                                                   repairedAt: [123_456]))
        result.card = card
        started.reports.yield(.finished(.done(result)))
        started.reports.finish()
        let job = try #require(try await base.jobEventsUntilFinal(events).last)
        #expect(job.state == .done)
        #expect(job.message == "done after a repair (the card returned other data at byte 123456 once; rewritten and read back right) — remove card")
        let remembered = try #require(try await Ledger(path: f.ledgerPath).cards().first)
        #expect(remembered.verdict == "repaired" && remembered.repairs == 1 && !remembered.refused)
        #expect(remembered.writeBytesPerSecond == Double(1 << 20) / 0.5)
        #expect(started.job.knownCard?(card) == nil)
    }

    @Test("a card waiting for its image from a server is 'downloading', with the download's progress, then writing")
    func downloadingIsAStateWithProgress() async throws {
        let f = try await base.fixture()
        defer { f.card.close() }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await base.nextStarted(f.runner)
        func download(_ bytes: UInt64) -> WriteProgress {
            var p = WriteProgress(phase: .preparing, bytesDone: bytes, bytesTotal: 4 << 20, bytesPerSecond: 1e6, secondsRemaining: 3)
            p.bytesDownloaded = bytes
            p.downloadTotal = 4 << 20
            return p
        }
        started.reports.yield(.stage(.downloading, note: "downloading https://build.example/unit.img", unit: nil, progress: download(0)))
        started.reports.yield(.progress(download(1 << 20)))
        started.reports.yield(.stage(.writing, note: "raw image", unit: nil, progress: nil))
        started.reports.yield(.finished(.cancelled("cancelled")))
        started.reports.finish()
        let seen = try await base.jobEventsUntilFinal(events)
        let downloading = seen.filter { $0.state == .downloading }
        #expect(downloading.first?.message == "downloading https://build.example/unit.img")
        #expect(downloading.contains { $0.progress?.bytesDone == 1 << 20 && $0.progress?.bytesTotal == 4 << 20 }, "\(downloading)")
        let states = seen.map(\.state)
        #expect(states.firstIndex(of: .downloading)! < states.firstIndex(of: .writing)!, "\(states)")
        // In the ledger's history too (a new word in the same field for `--json` readers).
        let path = f.ledgerPath
        let recorded = try await TestSupport.offPool { try Command.check(["sqlite3", path, "SELECT message FROM jobEvent WHERE state = 'downloading'"]).stdout }
        #expect(recorded == "downloading https://build.example/unit.img\n", "\(recorded)")
    }

    @Test("a profile's probe = false turns the capacity probe off for its cards; it is on by default")
    func profileProbeFalseTurnsTheProbeOff() async throws {
        for (lines, expected) in [("probe = false", false), ("", true)] {
            let f = try await base.fixture(profileLines: lines)
            defer { f.card.close() }
            await f.station.handle(.block(.add, f.facts))
            let started = try await base.nextStarted(f.runner)
            #expect(started.job.probeCapacity == expected, "profile lines: \(lines)")
            started.reports.yield(.finished(.cancelled("cancelled")))
            started.reports.finish()
        }
    }

    @Test("a card much slower than its peers says so, with its speed and rating, in the done message")
    func slowCardIsSaidInTheDoneMessage() async throws {
        let f = try await base.fixture()
        defer { f.card.close() }
        let ledger = try Ledger(path: f.ledgerPath)
        for (i, rate) in [30e6, 28e6, 33e6].enumerated() {
            try await ledger.rememberCard(id: "rd-peer\(i)", strength: "reader", detail: "a peer", verdict: "good", reason: nil, job: nil,
                                          writeBytesPerSecond: rate)
        }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await base.nextStarted(f.runner)
        // 10 MB in 1 s: a third of its peers' 30 MB/s.
        var result = CardResult(write: WriteResult(imageFormat: "raw", imageSize: 10_000_000, bytesWritten: 10_000_000, bmapPath: nil,
                                                   verified: true, writeSeconds: 0.9, syncSeconds: 0.1, verifySeconds: 0.1), facts: f.facts)
        result.card = card
        started.reports.yield(.finished(.done(result)))
        started.reports.finish()
        let job = try #require(try await base.jobEventsUntilFinal(events).last)
        #expect(job.state == .done)
        #expect(job.message == "done — remove card; slow card: wrote at 10.0 MB/s, 0.33× its peers' 30.0 MB/s (median of 3 cards); "
                + "rated class unknown (no SD status register here: behind a USB reader)", "\(job.message ?? "")")
        #expect(try await ledger.jobs(.init(limit: 1)).first?.message == job.message)
    }

    @Test func aCardAsFastAsItsPeersOrWithTooFewPeersIsNotCalledSlow() {
        #expect(CardSpeed.note(rate: 20e6, peers: [30e6, 28e6, 33e6], rated: nil) == nil)
        #expect(CardSpeed.note(rate: 5e6, peers: [30e6, 28e6], rated: nil) == nil)
        let rated = RatedSpeed(label: "Class 10, U1", bytesPerSecond: 10e6)
        #expect(CardSpeed.note(rate: 5e6, peers: [30e6, 20e6, 28e6, 33e6], rated: rated)
                == "slow card: wrote at 5.0 MB/s, 0.17× its peers' 29.0 MB/s (median of 4 cards); rated Class 10, U1: 10 MB/s, below its rating")
    }

    /// SSRs as a Linux MMC host prints them: a SanDisk Extreme (class 10, U3, V30) and an
    /// old class 4 card; a malformed one gives no rating.
    @Test func theRatedSpeedIsReadFromTheSDStatusRegister() {
        func ssr(speedClass: UInt8, uhs: UInt8, video: UInt8) -> String {
            var bytes = [UInt8](repeating: 0, count: 64)
            bytes[8] = speedClass
            bytes[14] = uhs << 4
            bytes[15] = video
            return bytes.map { String(format: "%02x", $0) }.joined()
        }
        #expect(RatedSpeed.parse(ssr: ssr(speedClass: 4, uhs: 3, video: 30)) == RatedSpeed(label: "Class 10, U3, V30", bytesPerSecond: 30e6))
        #expect(RatedSpeed.parse(ssr: ssr(speedClass: 2, uhs: 0, video: 0)) == RatedSpeed(label: "Class 4", bytesPerSecond: 4e6))
        #expect(RatedSpeed.parse(ssr: ssr(speedClass: 0, uhs: 0, video: 0)) == nil)
        #expect(RatedSpeed.parse(ssr: "00ff") == nil)
    }

    @Test("a counterfeit FakeCard, remembered, is refused on sight the next time, before anything is written")
    func fakeCardRefusedOnSight() async throws {
        let scratch = try TemporaryDirectory("provision-cardmemory")
        defer { scratch.remove() }
        let image = try scratch.write("image.img", filler(2 << 20, seed: 5))
        let ledger = try Ledger(path: scratch.file("ledger.sqlite"))
        let fake = try FakeCard(label: "remembered", claimedSize: 64 << 20, lie: .wraps(realSize: 16 << 20))
        defer { fake.close() }
        var job = CardJob(image: image, target: fake.devicePath, policy: nil)
        job.bmap = .none
        job.knownCard = { try? ledger.cardRefusal(id: $0.id) }
        guard case .failed(let first) = CardPipeline(job: job, sink: NoSink()).run() else {
            Issue.record("the counterfeit card was written")
            return
        }
        let card = try #require(first.card)
        #expect(card.strength == .reader && card.id.hasPrefix("rd-"))
        #expect(first.verdict == .counterfeit)
        try await ledger.rememberCard(id: card.id, strength: card.strength.rawValue, detail: card.detail, verdict: "counterfeit",
                                      reason: first.message, job: 1)
        let before = try fake.card.sha256()
        guard case .failed(let second) = CardPipeline(job: job, sink: NoSink()).run() else {
            Issue.record("a remembered counterfeit card was written")
            return
        }
        #expect(second.kind == .refused && second.card == card && second.verdict == nil)
        #expect(second.message.hasPrefix("refusing card \(card.id): found counterfeit on "), "\(second.message)")
        #expect(second.message.contains("stores about 16.8 MB"))
        #expect(try fake.card.sha256() == before)
        try await ledger.forgetCard(id: card.id)
        #expect(try ledger.cardRefusal(id: card.id) == nil)
    }
}

private struct NoSink: CardReportSink {
    func receive(_ report: CardReport) {}
}
