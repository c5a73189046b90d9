import ControlProtocol
import Foundation

/// The lab's view (issue 18), answered by any station that shares the lab's ledger: read from
/// the database, so it shows what every station has sent, plus this station's own outbox (what
/// it has not sent yet, and why).
extension Station {
    public func labStatus() async throws -> LabStatus {
        guard let shared = ledger.shared else { throw NotShared(station: config.name, ledger: ledger.path) }
        var status: LabStatus
        do { status = try await shared.labStatus() } catch let failure as LinkFailure {
            // The moment an operator asks most is when the database is away: what this station
            // holds back is known here, and said with the failure.
            let outbox = await shared.outboxState()
            let since = outbox.downSince.map { ", unreachable since \(ISO8601DateFormatter().string(from: $0))" } ?? ""
            throw LinkFailure("\(failure.message); this station: \(outbox.pending) row(s) not yet sent, \(outbox.unitsReserved) unit number(s) in hand\(since)")
        }
        status.outbox = await shared.outboxState()
        return status
    }

    public func labJobs(station: String?, state: String?, slot: String?, limit: Int) async throws -> [JobRecord] {
        guard let shared = ledger.shared else { throw NotShared(station: config.name, ledger: ledger.path) }
        return try await shared.labJobs(station: station, state: state, slot: slot, limit: limit)
    }

    public struct NotShared: Error, CustomStringConvertible {
        let station: String, ledger: String
        public var description: String {
            "station \(station) keeps its own ledger (\(ledger)), shared with no other station: --lab needs ledger = \"postgresql://…\" in the station config"
        }
    }
}
