@testable import Board
import ControlProtocol
import Foundation
import Testing

/// The board's lab view (issues 18 and 19): every station of a shared ledger, from the lab
/// status the daemon reads from the database; absent for a station with its own ledger.
@Suite("board: the lab view")
struct BoardLabTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)

    func lab(problemHash: String = "") -> LabStatus {
        let running = JobRecord(id: 7, kind: "sd", slot: "B2", device: "/dev/sdc", serial: nil, unit: "unit-042", profile: "p", image: "/srv/os.img",
                                state: .verifying, message: "checking" + problemHash, created: Self.now, updated: Self.now,
                                users: [UnitAccount(name: "tech", uid: 1000, generatedPassword: "hunter2")])
        var job = running
        job.station = "tower-2"
        return LabStatus(database: "postgresql://provision@db:5432/lab", stations: [
            LabStationStatus(name: "tower-1", lastSeen: Self.now, live: true, outboxPending: 0, jobs: 10, doneToday: 9, failedToday: 1, running: []),
            LabStationStatus(name: "tower-2", lastSeen: Self.now.addingTimeInterval(-600), live: false, outboxPending: 3, jobs: 4,
                             doneToday: 2, failedToday: 0, running: [job]),
        ], unitsNumbered: 14)
    }

    @Test func everyStationWithItsDayAndRunningJobs() throws {
        var state = BoardState()
        state.connected(station: "tower-1")
        state.apply(lab: lab())
        let view = try #require(state.snapshot().lab)
        #expect(view.stations.map(\.name) == ["tower-1", "tower-2"])
        #expect(view.stations[0].here && !view.stations[1].here)
        #expect(view.stations[0].seen == "live" && view.stations[1].seen.hasPrefix("last seen "))
        #expect(view.stations[1].unsent == 3 && view.stations[1].doneToday == 2)
        let job = try #require(view.stations[1].running.first)
        #expect(job.name == "B2" && job.word == "verifying" && job.unit == "unit-042" && job.tone == .verifying)
        #expect(view.unitsNumbered == 14 && view.problem == nil)
    }

    @Test func aStationWithItsOwnLedgerHasNoLabSection() {
        var state = BoardState()
        state.apply(lab: lab())
        state.labUnavailable(nil)
        #expect(state.snapshot().lab == nil)
    }

    @Test func aDatabaseAwayKeepsTheLastViewAndSaysWhy() throws {
        var state = BoardState()
        state.apply(lab: lab())
        state.labUnavailable("the shared ledger postgresql://provision@db:5432/lab is unreachable: connection refused")
        let view = try #require(state.snapshot().lab)
        #expect(view.stations.count == 2)
        #expect(view.problem?.contains("unreachable") == true)
        state.apply(lab: lab())
        #expect(state.snapshot().lab?.problem == nil)
    }

    @Test func anUnchangedLabIsNotNews() {
        var state = BoardState()
        var other = lab()
        other.unitsNumbered += 1
        // (call, whether the board's lab changed), in order.
        var steps: [(String, Bool)] = []
        func step(_ name: String, _ changed: Bool) { steps.append((name, changed)) }
        step("first lab", state.apply(lab: lab()))
        step("same lab again", state.apply(lab: lab()))
        step("another lab", state.apply(lab: other))
        step("database away", state.labUnavailable("the shared ledger is unreachable"))
        step("database still away", state.labUnavailable("the shared ledger is unreachable"))
        step("away for another reason", state.labUnavailable("the shared ledger is unreachable: timeout"))
        step("back, same lab", state.apply(lab: other))
        step("own ledger", state.labUnavailable(nil))
        step("own ledger again", state.labUnavailable(nil))
        #expect(steps.map(\.1) == [true, false, true, true, false, true, true, true, false], "\(steps)")
        #expect(state.snapshot().lab == nil)
    }

    @Test func eventsDoNotRebuildTheLabSection() throws {
        var state = BoardState()
        state.connected(station: "tower-1")
        state.apply(lab: lab())
        let built = state.labSectionBuilds
        let before = try #require(state.snapshot().lab)
        let slot = SlotStatus(name: "A", profile: "p", device: "/dev/loop3", job: nil, refusals: nil)
        state.apply(StationStatus(station: "tower-1", slots: [slot], otherJobs: [], refused: []))
        for percent in 1...50 {
            let progress = JobProgress(bytesDone: UInt64(percent) << 20, bytesTotal: 100 << 20, bytesPerSecond: 1e7, secondsRemaining: 5)
            state.apply(Event(kind: .job, job: JobRecord(id: 3, kind: "sd", slot: "A", device: "/dev/loop3", serial: nil, unit: nil, profile: "p",
                                                         image: "/srv/os.img", state: .writing, progress: progress, message: nil,
                                                         created: Self.now, updated: Self.now)))
            #expect(state.snapshot().lab == before)
        }
        #expect(state.labSectionBuilds == built, "a job event rebuilt the lab section")
        // The station's own row follows a renamed station (a reload), without a new lab read.
        state.connected(station: "tower-2")
        let view = try #require(state.snapshot().lab)
        #expect(!view.stations[0].here && view.stations[1].here)
    }

    @Test func theHubSendsAnUnchangedLabOnce() async throws {
        let hub = BoardHub()
        let (id, snapshots) = await hub.subscribe()
        var pages = snapshots.makeAsyncIterator()
        _ = await pages.next()
        await hub.apply(.lab(lab()))
        #expect(try #require(await pages.next()).lab?.stations.count == 2)
        let sent = await hub.broadcasts
        for _ in 0..<5 { await hub.apply(.lab(lab())) }
        #expect(await hub.broadcasts == sent, "an unchanged lab was sent to the page again")
        await hub.apply(.labUnavailable("the shared ledger is unreachable"))
        await hub.apply(.labUnavailable("the shared ledger is unreachable"))
        #expect(await hub.broadcasts == sent + 1)
        #expect(try #require(await pages.next()).lab?.problem == "the shared ledger is unreachable")
        // Everything else still reaches the page.
        await hub.touch()
        #expect(await hub.broadcasts == sent + 2)
        await hub.unsubscribe(id)
    }

    /// The poller's own connection cannot be opened (here: a socket path longer than a Unix
    /// address holds, which the client refuses before connecting): that is said as the
    /// station refusing the board, in the feed's words, not as the lab's database failing.
    @Test func aConnectionThatCannotOpenIsNotADatabaseProblem() async throws {
        let path = "/tmp/" + String(repeating: "x", count: 200) + ".sock"
        let (messages, continuation) = AsyncStream.makeStream(of: StationFeed.Message.self)
        let poller = LabPoller(socketPath: path, output: continuation)
        let thread = Thread { poller.loop(); continuation.finish() }
        thread.name = "test-lab-poller"
        thread.start()
        var received = messages.makeAsyncIterator()
        let first = await received.next()
        poller.stop()
        while await received.next() != nil {}  // the poller's thread has ended
        guard case .labUnavailable(let reason?) = first else {
            Issue.record("expected the reason the lab view is not current, got \(String(describing: first))")
            return
        }
        #expect(reason.hasPrefix("provisiond at \(path) refused the board: "), "\(reason)")
        #expect(reason.contains("socket path too long"), "\(reason)")
    }

    @Test func noPasswordOrHashReachesTheLabView() throws {
        var state = BoardState()
        state.apply(lab: lab(problemHash: " $6$salt$abcdefghijklmnop"))
        let json = String(decoding: try BoardServer.encode(state.snapshot()), as: UTF8.self)
        #expect(!json.contains("hunter2") && !json.contains("$6$salt"), "\(json)")
        #expect(json.contains("[hash hidden]"))
    }
}
