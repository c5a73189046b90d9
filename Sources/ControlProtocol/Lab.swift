import Foundation

/// The lab's view (issue 18): every station that shares one PostgreSQL ledger, as the
/// database holds it, with the answering station's own link to it.
public struct LabStatus: Codable, Sendable, Equatable {
    /// The database, as `postgresql://user@host:port/db` (never a password).
    public var database: String
    public var stations: [LabStationStatus]
    /// Units that took a lab number, every station together.
    public var unitsNumbered: Int
    /// The answering station's outbox: set by the daemon that answered.
    public var outbox: LabOutbox?

    public init(database: String, stations: [LabStationStatus], unitsNumbered: Int, outbox: LabOutbox? = nil) {
        self.database = database; self.stations = stations; self.unitsNumbered = unitsNumbered; self.outbox = outbox
    }
}

public struct LabStationStatus: Codable, Sendable, Equatable {
    public var name: String
    /// When the station last reached the database.
    public var lastSeen: Date
    /// Reached it within the last 15 s (a station says it is alive every 2 s while connected).
    public var live: Bool
    /// Rows it had not yet sent when it last reached the database.
    public var outboxPending: Int
    public var jobs: Int
    public var doneToday: Int
    public var failedToday: Int
    /// Its jobs not yet in a final state, as the database last heard of them.
    public var running: [JobRecord]

    public init(name: String, lastSeen: Date, live: Bool, outboxPending: Int, jobs: Int, doneToday: Int, failedToday: Int, running: [JobRecord]) {
        self.name = name; self.lastSeen = lastSeen; self.live = live; self.outboxPending = outboxPending; self.jobs = jobs
        self.doneToday = doneToday; self.failedToday = failedToday; self.running = running
    }
}

/// One station's link to the shared ledger: what waits in its local outbox, and why.
public struct LabOutbox: Codable, Sendable, Equatable {
    public var connected: Bool
    public var pending: Int
    /// Lab unit numbers reserved ahead and not yet used.
    public var unitsReserved: Int
    public var lastError: String?
    public var downSince: Date?

    public init(connected: Bool, pending: Int, unitsReserved: Int, lastError: String?, downSince: Date?) {
        self.connected = connected; self.pending = pending; self.unitsReserved = unitsReserved
        self.lastError = lastError; self.downSince = downSince
    }
}
