import ControlProtocol
import Foundation

/// The lab's view (issue 18), answered by any station that shares the lab's ledger: read from
/// the database, so it shows what every station has sent, plus this station's own outbox (what
/// it has not sent yet, and why).
extension Station {
    public func labStatus() async throws -> LabStatus {
        guard let shared = ledger.shared else { throw NotShared(station: config.name, ledger: ledger.path) }
        var status = try await shared.labStatus()
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
