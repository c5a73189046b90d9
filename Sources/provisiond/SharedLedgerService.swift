import ServiceLifecycle
import Station

/// The replicator of a lab's shared ledger (issue 18), as one of the daemon's services: it
/// replays the local outbox into PostgreSQL until the daemon stops. What it has not sent by
/// then stays in the outbox, on local disk, and goes at the next start.
struct SharedLedgerService: Service {
    let shared: SharedLedger

    func run() async throws {
        await cancelWhenGracefulShutdown { await shared.run() }
    }
}
