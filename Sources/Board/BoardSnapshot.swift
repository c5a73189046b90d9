import Foundation

/// What the page gets, and all it gets: built field by field from the daemon's status and
/// events, never by passing a protocol type through. That is what keeps passwords and
/// hashes off the screen: `JobRecord.users` (which carries a generated password when the
/// board happens to run with admin rights) has no field to go to here, and the free-text
/// fields go through `Redaction.scrub`.
public struct BoardSnapshot: Codable, Sendable, Equatable {
    public var station: String
    /// False while the daemon cannot be reached; the tiles then show the last known state.
    public var connected: Bool
    /// Why the daemon is unreachable, in words (shown in the banner).
    public var problem: String?
    public var doneToday: Int
    public var failedToday: Int
    /// Configured slots first, in the config's order, then Tegra boards, then manual jobs.
    public var tiles: [Tile]

    public struct Tile: Codable, Sendable, Equatable {
        /// Stable across updates: "slot:NAME", "tegra:SERIAL", "job:ID".
        public var key: String
        public var kind: Kind
        public var name: String
        /// The colour: idle, busy, verifying, injecting, done, failed, refused.
        public var tone: Tone
        /// The word under the name: "writing", "done — remove card", "refused", …
        public var word: String
        /// 0…100 while a job with a known size runs.
        public var percent: Double?
        public var megabytesPerSecond: Double?
        public var secondsRemaining: Double?
        public var unit: String?
        public var device: String?
        public var image: String?
        /// The failure or refusal reason in full, or what the job is doing.
        public var detail: String?
        public var job: Int64?

        public enum Kind: String, Codable, Sendable { case slot, tegra, manual }
        public enum Tone: String, Codable, Sendable { case idle, busy, verifying, injecting, done, failed, refused }
    }

    /// Every station of the lab, when this station's ledger is a lab's shared one (issue 18);
    /// nil for a station with its own ledger.
    public var lab: Lab?

    public struct Lab: Codable, Sendable, Equatable {
        /// The database as `postgresql://user@host:port/db` (never a password).
        public var database: String
        /// Why the lab's view is not current (the database is away), in words.
        public var problem: String?
        public var unitsNumbered: Int
        public var stations: [Station]

        public struct Station: Codable, Sendable, Equatable {
            public var name: String
            /// This board's own station.
            public var here: Bool
            public var live: Bool
            /// "live", or when the station last reached the database.
            public var seen: String
            public var doneToday: Int
            public var failedToday: Int
            /// Rows the station had not yet sent to the database.
            public var unsent: Int
            /// Its jobs not yet finished, as the database has them (state, no progress).
            public var running: [Tile]
        }
    }

    public init(station: String, connected: Bool, problem: String?, doneToday: Int, failedToday: Int, tiles: [Tile]) {
        self.station = station; self.connected = connected; self.problem = problem
        self.doneToday = doneToday; self.failedToday = failedToday; self.tiles = tiles
    }
}

/// Free text from the daemon (job messages, refusal reasons) is shown in full, except
/// anything shaped like a crypt(3) hash: a message that quoted a shadow line by mistake
/// must not put it on a wall screen.
public enum Redaction {
    // $id$…: md5 (1), bcrypt (2a/2b/2x/2y), sha256/512 (5/6), yescrypt (y), gost (gy),
    // scrypt (7), sha1crypt; then the salt and hash up to a separator.
    private static let pattern = #"\$(1|2[abxy]?|5|6|7|y|gy|sha1|md5)\$[^\s"';,]+"#

    public static func scrub(_ text: String?) -> String? {
        guard let text else { return nil }
        guard text.contains("$") else { return text }
        return text.replacingOccurrences(of: pattern, with: "[hash hidden]", options: .regularExpression)
    }
}
