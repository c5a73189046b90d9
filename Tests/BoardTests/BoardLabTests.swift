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

    @Test func noPasswordOrHashReachesTheLabView() throws {
        var state = BoardState()
        state.apply(lab: lab(problemHash: " $6$salt$abcdefghijklmnop"))
        let json = String(decoding: try BoardServer.encode(state.snapshot()), as: UTF8.self)
        #expect(!json.contains("hunter2") && !json.contains("$6$salt"), "\(json)")
        #expect(json.contains("[hash hidden]"))
    }
}
