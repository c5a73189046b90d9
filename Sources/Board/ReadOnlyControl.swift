import ControlProtocol
import Foundation
import ProvisionClient

/// The board's only way to talk to provisiond: the CLI's `ControlClient`, held privately,
/// behind methods that can only send the reading calls. Nothing in this module can name a
/// changing method (flash, cancel, reload): `ReadCall` is the whole vocabulary, and the web
/// server has no route that takes a method from a request. Even so the board should run as
/// a member of `provision` only (its systemd unit does), so the daemon refuses a changing
/// call on its own account too.
///
/// @unchecked Sendable: one thread makes the calls; another may only `shutdown()` it (a
/// syscall on the descriptor, safe from any thread) to end a blocking read.
final class ReadOnlyControl: @unchecked Sendable {
    /// Every call the board makes. A test checks each against `Method.changesState`.
    enum ReadCall: CaseIterable {
        case status, jobs, watch, labStatus

        var method: Method {
            switch self {
            case .status: return .status
            case .jobs: return .jobs
            case .watch: return .watch
            case .labStatus: return .labStatus
            }
        }
    }

    private let client: ControlClient
    var greeting: Hello { client.greeting }

    init(socket: String) throws {
        client = try ControlClient(path: socket)
    }

    func status() throws -> StationStatus {
        guard let status = try call(.status).status else { throw CLIError.unreachable("provisiond sent a status reply without a status") }
        return status
    }

    /// Finished jobs in `states`, newest first, as many as the ledger gives (capped there).
    func finishedJobs(states: [JobState]) throws -> [JobRecord] {
        try states.flatMap { try call(.jobs, .init(state: $0.rawValue, limit: 10_000)).jobs ?? [] }
    }

    /// Every station of the lab (issue 18). `nil` when this station keeps its own ledger
    /// (the daemon answers "bad request": there is no lab to show); throws when the daemon
    /// or the lab's database cannot answer.
    func labStatus() throws -> LabStatus? {
        do {
            return try call(.labStatus).lab
        } catch let error as CLIError where error.status == 65 {
            return nil
        }
    }

    /// Turns this connection into the event stream; returns the status at that moment.
    func watch() throws -> StationStatus {
        guard let status = try call(.watch).status else { throw CLIError.unreachable("provisiond sent a watch reply without a status") }
        return status
    }

    func nextEvent() throws -> Event? { try client.nextEvent() }

    /// Unblocks a thread waiting in `nextEvent` or a call.
    func shutdown() { client.shutdown() }

    private func call(_ call: ReadCall, _ params: Request.Params? = nil) throws -> ResultPayload {
        try client.call(call.method, params)
    }
}
