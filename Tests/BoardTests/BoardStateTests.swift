@testable import Board
import ControlProtocol
import Foundation
import Testing

/// What a tile shows, from the daemon's status and events, without a daemon: the page's
/// words and colours, the order of the slots, the day's counts, and that no password or
/// hash gets into what the page is sent.
@Suite("board state")
struct BoardStateTests {
    static let now = Date(timeIntervalSince1970: 1_800_000_000)
    static var utc: Calendar { var c = Calendar(identifier: .gregorian); c.timeZone = TimeZone(identifier: "UTC")!; return c }

    func job(_ id: Int64, slot: String?, _ state: JobState, kind: String = "sd", message: String? = nil, unit: String? = nil,
             progress: JobProgress? = nil, users: [UnitAccount]? = nil, updated: Date = now, serial: String? = nil) -> JobRecord {
        JobRecord(id: id, kind: kind, slot: slot, device: "/dev/loop\(id)", serial: serial, unit: unit, profile: "p", image: "/srv/images/os.img",
                  state: state, progress: progress, message: message, created: updated, updated: updated, users: users)
    }

    func status(_ slots: [SlotStatus], other: [JobRecord] = []) -> StationStatus {
        StationStatus(station: "bench-1", slots: slots, otherJobs: other, refused: [])
    }

    func slot(_ name: String, device: String? = nil, job: JobRecord? = nil, refusals: [String]? = nil) -> SlotStatus {
        SlotStatus(name: name, profile: "p", device: device ?? job?.device, job: job, refusals: refusals)
    }

    func tile(_ state: BoardState, _ key: String) -> BoardSnapshot.Tile? {
        state.snapshot(now: Self.now, calendar: Self.utc).tiles.first { $0.key == key }
    }

    @Test func tilesFollowTheConfigOrderNotTheAlphabet() {
        var state = BoardState()
        state.apply(status([slot("top-3"), slot("A"), slot("b-1")]))
        #expect(state.snapshot().tiles.map(\.name) == ["top-3", "A", "b-1"])
        #expect(state.snapshot().tiles.allSatisfy { $0.word == "idle" && $0.tone == .idle })
    }

    @Test func writingShowsPercentSpeedAndTimeLeft() {
        var state = BoardState()
        state.apply(status([slot("A")]))
        let progress = JobProgress(bytesDone: 25 << 20, bytesTotal: 100 << 20, bytesPerSecond: 12_345_678, secondsRemaining: 6.4)
        state.apply(Event(kind: .job, job: job(7, slot: "A", .writing, unit: "lab-A-007", progress: progress)))
        let t = tile(state, "slot:A")
        #expect(t?.word == "writing")
        #expect(t?.tone == .busy)
        #expect(t?.percent == 25)
        #expect(t?.megabytesPerSecond == 12.3)
        #expect(t?.secondsRemaining == 6)
        #expect(t?.unit == "lab-A-007")
    }

    @Test func eachStateHasItsWordAndColour() {
        let expected: [(JobState, BoardSnapshot.Tile.Tone, String)] = [
            (.writing, .busy, "writing"), (.syncing, .busy, "writing"), (.verifying, .verifying, "verifying"),
            (.injecting, .injecting, "injecting"), (.done, .done, "done — remove card"), (.failed, .failed, "failed"),
            (.interrupted, .failed, "interrupted — rewrite card"), (.cancelled, .failed, "cancelled — card incomplete"),
        ]
        for (jobState, tone, word) in expected {
            var state = BoardState()
            state.apply(status([slot("A", job: job(1, slot: "A", jobState))]))
            #expect(tile(state, "slot:A")?.tone == tone, "\(jobState)")
            #expect(tile(state, "slot:A")?.word == word, "\(jobState)")
        }
    }

    @Test func aRefusedCardShowsEveryReasonInFull() {
        var state = BoardState()
        let reasons = ["card is write-protected: slide the lock switch", "size 2.0 GB is below the image's 4.0 GB"]
        state.apply(status([slot("A", device: "/dev/sdc", refusals: reasons)]))
        let t = tile(state, "slot:A")
        #expect(t?.word == "refused")
        #expect(t?.tone == .refused)
        #expect(t?.detail == reasons.joined(separator: "; "))
    }

    @Test func aPulledCardKeepsShowingItsFailureUntilTheNextCard() {
        var state = BoardState()
        state.apply(status([slot("A", job: job(3, slot: "A", .writing))]))
        state.apply(Event(kind: .job, job: job(3, slot: "A", .failed, message: "card removed during writing; the card is incomplete")))
        // The daemon forgets the slot's job once the card is gone; the board does not.
        state.apply(status([slot("A")]))
        #expect(tile(state, "slot:A")?.word == "failed")
        #expect(tile(state, "slot:A")?.detail == "card removed during writing; the card is incomplete")
        // A new card in the slot.
        state.apply(status([slot("A", device: "/dev/loop9")]))
        #expect(tile(state, "slot:A")?.word == "idle")
    }

    @Test func aDoneCardThatIsPulledLeavesAnIdleSlot() {
        var state = BoardState()
        state.apply(status([slot("A", job: job(3, slot: "A", .done))]))
        #expect(tile(state, "slot:A")?.word == "done — remove card")
        #expect(tile(state, "slot:A")?.percent == 100)
        state.apply(status([slot("A")]))
        #expect(tile(state, "slot:A")?.word == "idle")
    }

    @Test func aLateEventOfAnOlderJobDoesNotReplaceTheNewOne() {
        var state = BoardState()
        state.apply(status([slot("A", job: job(5, slot: "A", .writing))]))
        state.apply(Event(kind: .job, job: job(4, slot: "A", .failed)))
        #expect(tile(state, "slot:A")?.job == 5)
    }

    @Test func tegraBoardsHaveTheirOwnTilesOneABoard() {
        var state = BoardState()
        state.apply(status([slot("A")], other: [job(8, slot: nil, .miniloader, kind: "tegra", serial: "0123456789abcdef")]))
        state.apply(Event(kind: .job, job: job(9, slot: nil, .bootloader, kind: "tegra", serial: "0123456789abcdef")))
        let tiles = state.snapshot(now: Self.now, calendar: Self.utc).tiles
        #expect(tiles.map(\.kind) == [.slot, .tegra])
        #expect(tiles[1].word == "bootloader")
        #expect(tiles[1].name == "Tegra …89abcdef")
    }

    @Test func countsCoverTodayOnly() {
        var state = BoardState()
        let yesterday = Self.now.addingTimeInterval(-86_400)
        state.apply(finishedJobs: [job(1, slot: "A", .done, updated: yesterday), job(2, slot: "A", .done),
                                   job(3, slot: "A", .failed), job(4, slot: "A", .interrupted)])
        state.apply(Event(kind: .job, job: job(5, slot: "A", .done)))
        state.apply(Event(kind: .job, job: job(5, slot: "A", .done)))  // announced twice, counted once
        let snapshot = state.snapshot(now: Self.now, calendar: Self.utc)
        #expect(snapshot.doneToday == 2)
        #expect(snapshot.failedToday == 2)
    }

    @Test func oldFinishedJobsAreForgottenButTodaysCount() {
        var state = BoardState()
        let old = Self.now.addingTimeInterval(-5 * 86_400)
        state.apply(finishedJobs: (1...Int64(BoardState.pruneThreshold)).map { job($0, slot: "A", .done, updated: old) })
        state.apply(finishedJobs: [job(100_000, slot: "A", .done)])
        state.apply(Event(kind: .job, job: job(100_001, slot: "A", .failed)))  // past the threshold: prunes
        let snapshot = state.snapshot(now: Self.now, calendar: Self.utc)
        #expect(snapshot.doneToday == 1)
        #expect(snapshot.failedToday == 1)
        #expect(state.finishedCount == 2)
    }

    @Test func disconnectionIsReportedWithItsReasonAndTheLastTilesStay() {
        var state = BoardState()
        state.connected(station: "bench-1")
        state.apply(status([slot("A", job: job(1, slot: "A", .writing))]))
        state.disconnected("cannot reach provisiond at /run/provision/control.sock: Connection refused")
        let snapshot = state.snapshot()
        #expect(!snapshot.connected)
        #expect(snapshot.problem?.contains("Connection refused") == true)
        #expect(snapshot.tiles.count == 1)
    }

    @Test func noPasswordOrHashReachesThePage() throws {
        // As an admin connection (a board run as root) would receive them: the generated
        // password in the job's users, and a hash that a message quoted.
        let password = "Xq7-secret-Pw-91"
        let hash = "$6$rounds=5000$saltsalt$Qm9vYmFyYmF6cXV4cXV1eHF1dXhxdXV4cXV1eA"
        let yescrypt = "$y$j9T$abcdefgh$ijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"
        var state = BoardState()
        state.apply(status([slot("A")]))
        let done = job(1, slot: "A", .done, message: "shadow line was tech:\(hash):19000, other \(yescrypt)", unit: "lab-A-001",
                       users: [UnitAccount(name: "tech", uid: 1000, generatedPassword: password)])
        state.apply(Event(kind: .job, job: done))
        state.apply(status([slot("A", device: "/dev/sdz", refusals: ["odd reason quoting \(hash)"]), slot("B", job: done)]))
        let json = String(decoding: try BoardServer.encode(state.snapshot()), as: UTF8.self)
        #expect(!json.contains(password))
        #expect(!json.contains("saltsalt"))
        #expect(!json.contains("$6$"))
        #expect(!json.contains("$y$"))
        #expect(json.contains("[hash hidden]"))
        #expect(json.contains("lab-A-001"), "the unit name itself is shown")
    }

    @Test func redactionLeavesOrdinaryDollarSignsAlone() {
        #expect(Redaction.scrub("cost $5 per card") == "cost $5 per card")
        #expect(Redaction.scrub("x $1$abc$def y") == "x [hash hidden] y")
    }
}

@Suite("board: read-only by construction")
struct ReadOnlyTests {
    @Test func everyCallTheBoardCanMakeIsAReadingCall() {
        for call in ReadOnlyControl.ReadCall.allCases {
            #expect(!call.method.changesState, "\(call) → \(call.method) changes the station")
        }
        // And the changing methods exist, so the check above could fail.
        #expect(Method.allCases.contains { $0.changesState })
        let reachable = Set(ReadOnlyControl.ReadCall.allCases.map(\.method))
        for method in Method.allCases where method.changesState { #expect(!reachable.contains(method)) }
    }
}

@Suite("board: --listen")
struct ListenAddressTests {
    @Test func acceptsNumericAddresses() throws {
        #expect(try ListenAddress(parsing: "127.0.0.1:8080") == .init(host: "127.0.0.1", port: 8080))
        #expect(try ListenAddress(parsing: "0.0.0.0:0").port == 0)
        #expect(try ListenAddress(parsing: "[::1]:9000") == .init(host: "::1", port: 9000))
        #expect(try ListenAddress(parsing: "[::]:80").description == "[::]:80")
    }

    @Test(arguments: [
        ("localhost:8080", "not a numeric IP address"),
        ("8080", "no port"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:http", "not a port number"),
        ("127.0.0.1:70000", "not a port number"),
        ("::1:8080", "brackets"),
        ("[::1]8080", "port after the bracket"),
        ("", "no port"),
    ])
    func refusesWithTheReason(text: String, reason: String) {
        #expect {
            try ListenAddress(parsing: text)
        } throws: { error in
            (error as? BoardError)?.description.contains(reason) == true
        }
    }
}
