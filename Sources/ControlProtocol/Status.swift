import Foundation

/// A job's life (DESIGN.md §2). A state is announced only after the ledger recorded it.
public enum JobState: String, Codable, Sendable, CaseIterable {
    /// `downloading`: the card waits for its image from a server (issue 17); a new value
    /// of the same string field, so `--json` readers see one more word, nothing renamed.
    case queued, downloading, writing, syncing, verifying, injecting, checking
    // Tegra boards in USB recovery:
    case rcm, miniloader, bct, bootloader, flashingOnDevice = "flashing-on-device"
    case done, failed, cancelled
    /// The daemon died while the job ran: the card must be rewritten.
    case interrupted

    public var isFinal: Bool { [.done, .failed, .cancelled, .interrupted].contains(self) }
}

public struct JobProgress: Codable, Sendable, Equatable {
    public var bytesDone: UInt64
    public var bytesTotal: UInt64?
    public var bytesPerSecond: Double
    public var secondsRemaining: Double?

    public init(bytesDone: UInt64, bytesTotal: UInt64?, bytesPerSecond: Double, secondsRemaining: Double?) {
        self.bytesDone = bytesDone; self.bytesTotal = bytesTotal; self.bytesPerSecond = bytesPerSecond; self.secondsRemaining = secondsRemaining
    }

    public var fraction: Double? {
        guard let bytesTotal, bytesTotal > 0 else { return nil }
        return min(1, Double(bytesDone) / Double(bytesTotal))
    }
}

public struct UnitAccount: Codable, Sendable, Equatable {
    public var name: String
    public var uid: Int
    /// Shown once, to admins, in the job's result (`watch --json`); never stored by the daemon.
    public var generatedPassword: String?
    /// Where the generated password was appended (the station's 0600 export file); set for
    /// every generated password, kept in the ledger, and what the text UI shows instead of it.
    public var passwordExport: String?
    public init(name: String, uid: Int, generatedPassword: String? = nil, passwordExport: String? = nil) {
        self.name = name; self.uid = uid; self.generatedPassword = generatedPassword; self.passwordExport = passwordExport
    }

    /// The account without its password, for everyone but an admin's one announcement.
    public var redacted: UnitAccount { UnitAccount(name: name, uid: uid, passwordExport: passwordExport) }

    /// "pi: password exported to /var/lib/provision/passwords.tsv" — what a shared screen may
    /// say about a generated password; nil for accounts whose password was not generated.
    public var passwordNote: String? {
        guard let passwordExport else { return nil }
        return "\(name): password exported to \(passwordExport)"
    }
}

public struct JobRecord: Codable, Sendable, Equatable {
    public var id: Int64
    public var kind: String  // "sd" or "tegra"
    public var slot: String?
    public var device: String
    public var serial: String?
    public var unit: String?
    public var profile: String?
    public var image: String?
    public var state: JobState
    public var progress: JobProgress?
    public var message: String?
    public var created: Date
    public var updated: Date
    public var users: [UnitAccount]?
    /// The station that wrote the card: set in the lab's view (a shared ledger, issue 18).
    public var station: String?

    public init(id: Int64, kind: String, slot: String?, device: String, serial: String?, unit: String?, profile: String?, image: String?,
                state: JobState, progress: JobProgress? = nil, message: String? = nil, created: Date, updated: Date, users: [UnitAccount]? = nil) {
        self.id = id; self.kind = kind; self.slot = slot; self.device = device; self.serial = serial; self.unit = unit
        self.profile = profile; self.image = image; self.state = state; self.progress = progress; self.message = message
        self.created = created; self.updated = updated; self.users = users
    }
}

/// A device the daemon sees, with its safety verdict.
public struct DeviceStatus: Codable, Sendable, Equatable {
    public var device: String
    public var summary: String
    public var size: UInt64
    public var serial: String?
    public var slot: String?
    public var slotPath: String?
    public var eligible: Bool
    /// Why it will not be written; empty when eligible.
    public var refusals: [String]

    public init(device: String, summary: String, size: UInt64, serial: String?, slot: String?, slotPath: String?, eligible: Bool, refusals: [String]) {
        self.device = device; self.summary = summary; self.size = size; self.serial = serial; self.slot = slot
        self.slotPath = slotPath; self.eligible = eligible; self.refusals = refusals
    }
}

public struct SlotStatus: Codable, Sendable, Equatable {
    public var name: String
    public var profile: String
    public var device: String?
    public var job: JobRecord?
    /// Set when the card in the slot was refused.
    public var refusals: [String]?

    public init(name: String, profile: String, device: String?, job: JobRecord?, refusals: [String]?) {
        self.name = name; self.profile = profile; self.device = device; self.job = job; self.refusals = refusals
    }
}

public struct StationStatus: Codable, Sendable, Equatable {
    public var station: String
    public var slots: [SlotStatus]
    /// Running jobs not tied to a slot (manual `flash`, Tegra boards).
    public var otherJobs: [JobRecord]
    /// Devices seen but not written, with their reasons.
    public var refused: [DeviceStatus]

    public init(station: String, slots: [SlotStatus], otherJobs: [JobRecord], refused: [DeviceStatus]) {
        self.station = station; self.slots = slots; self.otherJobs = otherJobs; self.refused = refused
    }
}

public struct Event: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable { case job, device, deviceRemoved = "device-removed", reload }
    public var kind: Kind
    public var job: JobRecord?
    public var device: DeviceStatus?
    public var message: String?
    public init(kind: Kind, job: JobRecord? = nil, device: DeviceStatus? = nil, message: String? = nil) {
        self.kind = kind; self.job = job; self.device = device; self.message = message
    }
}
