import Foundation

/// The control socket's language (DESIGN.md §7): newline-delimited JSON over AF_UNIX.
/// The daemon speaks first with a `hello`; then every request line gets one reply line with
/// the same `id`; `watch` turns the connection into a stream of `event` lines.
public enum ControlProtocol {
    /// Bumped on any incompatible change; the CLI refuses a daemon with another major.
    public static let version = 1
    /// Longest accepted request line; longer ones get an error reply and the connection is
    /// closed. Requests are small (a method and a few names): 64 KiB is far beyond any, and
    /// keeps what a client can make the daemon buffer small.
    public static let maxLineLength = 64 << 10
    public static let defaultSocketPath = "/run/provision/control.sock"
}

public enum Method: String, Codable, Sendable, CaseIterable {
    case status, devices, jobs, watch, flash, cancel, reload
    /// The station's counters in Prometheus' text format (issue 18), for a scraper that reads
    /// through this socket: the daemon itself keeps no IP socket.
    case metrics
    /// Cards remembered (issue 16): list them; forget one (admins).
    case cards, forgetCard = "forget-card"
    /// Every station of the lab, from the shared ledger (issue 18): `status --lab`, `jobs --lab`.
    case labStatus = "lab-status", labJobs = "lab-jobs"

    /// Changing calls need root or the admin group; reading ones the socket's group.
    public var changesState: Bool {
        switch self {
        case .status, .devices, .jobs, .watch, .metrics, .cards, .labStatus, .labJobs: return false
        case .flash, .cancel, .reload, .forgetCard: return true
        }
    }
}

public struct Request: Codable, Sendable, Equatable {
    public var id: Int
    public var method: String
    public var params: Params?

    public init(id: Int, method: Method, params: Params? = nil) {
        self.id = id
        self.method = method.rawValue
        self.params = params
    }

    public struct Params: Codable, Sendable, Equatable {
        // jobs
        public var state: String?
        public var slot: String?
        public var device: String?
        public var limit: Int?
        // flash
        public var profile: String?
        public var image: String?
        // cancel
        public var job: Int64?
        // forget-card
        public var card: String?
        // lab-jobs: one station's only
        public var station: String?

        public init(state: String? = nil, slot: String? = nil, device: String? = nil, limit: Int? = nil,
                    profile: String? = nil, image: String? = nil, job: Int64? = nil, card: String? = nil) {
            self.state = state; self.slot = slot; self.device = device; self.limit = limit
            self.profile = profile; self.image = image; self.job = job; self.card = card
        }

        public init(labJobsOf station: String?, state: String?, slot: String?, limit: Int?) {
            self.init(state: state, slot: slot, limit: limit)
            self.station = station
        }
    }
}

/// One line from the daemon: a hello, a reply, or an event.
public struct ServerMessage: Codable, Sendable {
    public var hello: Hello?
    public var id: Int?
    public var ok: Bool?
    public var result: ResultPayload?
    public var error: ErrorPayload?
    public var event: Event?

    public init(hello: Hello) { self.hello = hello }
    public init(id: Int?, result: ResultPayload) { self.id = id; self.ok = true; self.result = result }
    public init(id: Int?, error: ErrorPayload) { self.id = id; self.ok = false; self.error = error }
    public init(event: Event) { self.event = event }
}

public struct Hello: Codable, Sendable, Equatable {
    public var protocolVersion: Int
    public var daemon: String
    public var station: String
    /// What this connection may do, from SO_PEERCRED: "read" or "admin".
    public var access: String

    public init(protocolVersion: Int = ControlProtocol.version, daemon: String, station: String, access: String) {
        self.protocolVersion = protocolVersion; self.daemon = daemon; self.station = station; self.access = access
    }
}

public struct ErrorPayload: Codable, Sendable, Equatable, Error, CustomStringConvertible {
    public enum Code: String, Codable, Sendable {
        case badRequest = "bad-request"
        case unknownMethod = "unknown-method"
        case permissionDenied = "permission-denied"
        case notFound = "not-found"
        case refused
        case conflict
        /// A `watch` client read too slowly to be sent every state change: it was disconnected.
        case tooSlow = "too-slow"
        case internalError = "internal"
    }
    public var code: Code
    public var message: String
    public init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    public var description: String { message }
}

public struct ResultPayload: Codable, Sendable {
    public var status: StationStatus?
    public var devices: [DeviceStatus]?
    public var jobs: [JobRecord]?
    public var job: JobRecord?
    public var message: String?
    /// `metrics`: Prometheus text exposition format 0.0.4, as one string.
    public var metrics: String?
    public var cards: [CardSummary]?
    /// `lab-status`: every station of a lab with a shared ledger.
    public var lab: LabStatus?

    public init(status: StationStatus? = nil, devices: [DeviceStatus]? = nil, jobs: [JobRecord]? = nil, job: JobRecord? = nil, message: String? = nil,
                metrics: String? = nil, cards: [CardSummary]? = nil, lab: LabStatus? = nil) {
        self.status = status; self.devices = devices; self.jobs = jobs; self.job = job; self.message = message; self.metrics = metrics; self.cards = cards
        self.lab = lab
    }
}

/// A card the station remembers (issue 16), as `provision cards` shows it.
public struct CardSummary: Codable, Sendable, Equatable {
    public var id: String
    /// "cid" (the SD card's own CID) or "reader" (weaker: reader serial, size, first sectors).
    public var strength: String
    public var detail: String
    /// good, repaired, counterfeit or failing; the last two refuse the card on sight.
    public var verdict: String
    public var reason: String?
    public var lastJob: Int64?
    public var firstSeen: Date
    public var lastSeen: Date
    public var repairs: Int
    public var writeBytesPerSecond: Double?
    /// Refused on sight until an admin forgets it.
    public var refused: Bool { verdict == "counterfeit" || verdict == "failing" }

    public init(id: String, strength: String, detail: String, verdict: String, reason: String?, lastJob: Int64?,
                firstSeen: Date, lastSeen: Date, repairs: Int, writeBytesPerSecond: Double?) {
        self.id = id; self.strength = strength; self.detail = detail; self.verdict = verdict; self.reason = reason
        self.lastJob = lastJob; self.firstSeen = firstSeen; self.lastSeen = lastSeen; self.repairs = repairs
        self.writeBytesPerSecond = writeBytesPerSecond
    }
}
