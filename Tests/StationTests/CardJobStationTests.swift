import BlockDevices
import ControlProtocol
import Foundation
@testable import ImageIO
import Pipeline
@testable import Station
import Testing
import TestSupport

/// The station's side of a card's pipeline: reports in, ledger rows and events out. A
/// scripted runner stands in for the pipeline so the tests choose the moment of each report;
/// the card, the ledger (SQLite) and the station are real.
@Suite("Card jobs in the station", .serialized)
struct CardJobStationTests {
    /// Hands each started card job to the test instead of running a pipeline.
    final class ScriptedRunner: JobRunning, @unchecked Sendable {
        struct Started: @unchecked Sendable {
            let job: CardJob
            let id: Int64
            let cancellation: CancellationFlag
            let reports: AsyncStream<CardReport>.Continuation
        }
        let started: AsyncStream<Started>
        private let continuation: AsyncStream<Started>.Continuation
        init() { (started, continuation) = AsyncStream<Started>.makeStream() }
        func start(_ context: JobContext) {}
        func startCard(_ job: CardJob, id: Int64, cancellation: CancellationFlag, reports: AsyncStream<CardReport>.Continuation) {
            continuation.yield(Started(job: job, id: id, cancellation: cancellation, reports: reports))
        }
    }

    /// Opens once; every waiter resumes then.
    actor Latch {
        private var open = false
        private var waiters: [CheckedContinuation<Void, Never>] = []
        func wait() async {
            if open { return }
            await withCheckedContinuation { waiters.append($0) }
        }
        func release() {
            open = true
            for w in waiters { w.resume() }
            waiters = []
        }
    }

    struct Fixture {
        let scratch: TemporaryDirectory
        let card: LoopCard
        let facts: DeviceFacts
        let station: Station
        let runner: ScriptedRunner
        let ledgerPath: String
    }

    /// `profileLines`: more keys of the profile, e.g. "probe = false".
    func fixture(profileLines: String = "") async throws -> Fixture {
        let scratch = try TemporaryDirectory("provision-cardjob")
        let image = try scratch.write("card.img", filler(1 << 20, seed: 9))
        let card = try LoopCard(label: "cardjob-\(UInt32.random(in: 0...UInt32.max))", size: 8 << 20)
        let facts = try DeviceFacts.read(path: card.devicePath)
        let toml = """
            [station]
            name = "cardjob-test"
            allow_loop_devices = true
            ledger = "\(scratch.file("ledger.sqlite"))"
            [profiles.p]
            image = "\(image)"
            \(profileLines)
            [[slots]]
            name = "S1"
            match = "\(facts.slotPath ?? "none")"
            profile = "p"
            """
        let config = try StationConfig.parse(text: toml, file: scratch.file("station.toml"))
        let runner = ScriptedRunner()
        let station = Station(config: config, ledger: try Ledger(path: config.ledgerPath), logger: quietLogger, jobRunner: runner)
        return Fixture(scratch: scratch, card: card, facts: facts, station: station, runner: runner, ledgerPath: config.ledgerPath)
    }

    func nextStarted(_ runner: ScriptedRunner) async throws -> ScriptedRunner.Started {
        for await s in runner.started { return s }
        throw StationTestError(description: "no card job started")
    }

    /// The job records announced until (and with) the first final one.
    func jobEventsUntilFinal(_ events: EventSubscription, seconds: Double = 600) async throws -> [JobRecord] {
        try await withThrowingTaskGroup(of: [JobRecord]?.self) { group in
            group.addTask {
                var seen: [JobRecord] = []
                for await e in events {
                    guard let job = e.job else { continue }
                    seen.append(job)
                    if job.state.isFinal { return seen }
                }
                return seen
            }
            group.addTask {
                try await Task.sleep(for: .seconds(seconds))
                return nil
            }
            defer { group.cancelAll() }
            guard let first = try await group.next(), let seen = first, seen.last?.state.isFinal == true else {
                throw StationTestError(description: "no final job state within \(seconds) s")
            }
            return seen
        }
    }

    @Test("a card pulled while its state change is being recorded ends 'failed — card removed', not cancelled")
    func pullDuringLedgerWriteIsNotLost() async throws {
        let f = try await fixture()
        defer { f.card.close() }
        let entered = Latch(), proceed = Latch()
        await f.station.setBeforeLedgerWrite { _, state in
            guard state == .writing else { return }
            await entered.release()
            await proceed.wait()
        }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await nextStarted(f.runner)
        #expect(started.job.expectedMedia == MediaIdentity(f.facts))
        started.reports.yield(.stage(.writing, note: nil, unit: nil, progress: nil))
        await entered.wait()
        // The ledger write of "writing" is in flight: the card is pulled now.
        await f.station.handle(.block(.remove, f.facts))
        #expect(started.cancellation.isCancelled, "pulling the card must stop its pipeline")
        await proceed.release()
        // The pipeline sees its cancellation and ends.
        started.reports.yield(.finished(.cancelled("cancelled after writing 0 bytes")))
        started.reports.finish()
        let job = try #require(try await jobEventsUntilFinal(events).last)
        #expect(job.state == .failed)
        #expect(job.message?.contains("card removed during writing") == true, "\(job.message ?? "")")
        let ledgered = try #require(try await f.station.jobs(.init()).first)
        #expect(ledgered.state == .failed && ledgered.message == job.message)
        // No device shows the job any more: the station keeps no record of it in memory.
        #expect(await f.station.finished.isEmpty, "a pulled card's finished job stays in memory")
    }

    @Test("new media on the node with no removal event between stops the old card's job as pulled, and the new card gets a job of its own")
    func cardSwappedWithoutRemovalEvent() async throws {
        let f = try await fixture()
        defer { f.card.close() }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let first = try await nextStarted(f.runner)
        first.reports.yield(.stage(.writing, note: nil, unit: nil, progress: nil))
        // The same node, another disk sequence: another card, as udev reports a swap it saw
        // only as a change.
        var swapped = f.facts
        swapped.diskSequence = (f.facts.diskSequence ?? 0) + 1000
        await f.station.handle(.block(.change, swapped))
        #expect(first.cancellation.isCancelled, "the old card's job must be stopped")
        first.reports.yield(.finished(.cancelled("cancelled after writing 0 bytes")))
        first.reports.finish()
        let ended = try #require(try await jobEventsUntilFinal(events).last)
        #expect(ended.state == .failed && ended.message?.contains("card removed") == true, "\(ended.state): \(ended.message ?? "")")
        let second = try await nextStarted(f.runner)
        #expect(second.job.expectedMedia?.diskSequence == swapped.diskSequence, "the new card's job is for the new media")
        second.reports.yield(.finished(.cancelled("test over")))
        second.reports.finish()
    }

    @Test("a ledger write that fails stops the job, is never announced, and the job ends failed saying so")
    func failedLedgerWriteFailsTheJob() async throws {
        let f = try await fixture()
        defer { f.card.close() }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await nextStarted(f.runner)
        // A real SQLite failure: the table of state changes is gone under the daemon.
        try Command.check(["sqlite3", f.ledgerPath, "DROP TABLE jobEvent"])
        started.reports.yield(.stage(.writing, note: nil, unit: nil, progress: nil))
        started.reports.yield(.finished(.done(CardResult(write: WriteResult(imageFormat: "raw", imageSize: 1 << 20, bytesWritten: 1 << 20, bmapPath: nil,
                                                                           verified: true, writeSeconds: 0.1, syncSeconds: 0, verifySeconds: 0.1)))))
        started.reports.finish()
        let announced = try await jobEventsUntilFinal(events)
        let seen = announced.map(\.state)
        let final = announced.last
        #expect(!seen.contains(.writing), "a state the ledger refused was announced: \(seen)")
        #expect(started.cancellation.isCancelled, "the pipeline must be stopped when its rows cannot be recorded")
        let job = try #require(final)
        #expect(job.state == .failed, "a card the ledger does not know must not end done")
        #expect(job.message?.contains("could not record this job") == true, "\(job.message ?? "")")
    }

    @Test("reports become states in order; accounts are recorded before done, and their passwords are not kept")
    func reportsBecomeLedgerRowsInOrder() async throws {
        let f = try await fixture()
        defer { f.card.close() }
        let events = await f.station.subscribe()
        await f.station.handle(.block(.add, f.facts))
        let started = try await nextStarted(f.runner)
        let progress = WriteProgress(phase: .writing, bytesDone: 1, bytesTotal: 2, bytesPerSecond: 1, secondsRemaining: 1)
        for stage in [CardStage.writing, .syncing, .verifying] {
            started.reports.yield(.stage(stage, note: nil, unit: nil, progress: progress))
        }
        started.reports.yield(.stage(.injecting, note: "adding tech", unit: "lab-001", progress: nil))
        let account = ProvisionedAccount(name: "tech", uid: 1000, gid: 1000, hash: "$6$salt$hash", generatedPassword: "secret-pw", exportedTo: nil)
        started.reports.yield(.accounts(unit: "lab-001", [account]))
        started.reports.yield(.stage(.checking, note: nil, unit: "lab-001", progress: nil))
        started.reports.yield(.finished(.done(CardResult(write: WriteResult(imageFormat: "raw", imageSize: 1, bytesWritten: 1, bmapPath: nil, verified: true,
                                                                           writeSeconds: 0, syncSeconds: 0, verifySeconds: 0),
                                                        unit: "lab-001", accounts: [account]))))
        started.reports.finish()
        let final = try await jobEventsUntilFinal(events).last
        #expect(final?.state == .done)
        #expect(final?.users?.first?.generatedPassword == "secret-pw", "shown once, in the final announcement")
        let states = try await f.station.ledger.events(job: started.id).map(\.state)
        #expect(states == [.queued, .writing, .syncing, .verifying, .injecting, .checking, .done])
        let users = try await f.station.ledger.users(job: started.id)
        #expect(users.count == 1 && users.first?.hash == "$6$salt$hash")
        let status = await f.station.status()
        #expect(status.slots.first?.job?.users?.first?.generatedPassword == nil, "a password must not outlive its announcement")
    }
}
