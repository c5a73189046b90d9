/// The parts of an image's `/etc/login.defs` that useradd honours when it allocates ids
/// and writes shadow aging fields. Missing keys fall back to shadow-utils' own defaults.
public struct LoginDefs: Sendable, Equatable {
    public var uidMin = 1000
    public var uidMax = 60000
    public var gidMin = 1000
    public var gidMax = 60000
    public var passMinDays = 0
    public var passMaxDays = 99999
    public var passWarnAge = 7
    /// HOME_MODE when set; otherwise homes are made 0750 (private to user and group).
    public var homeMode: UInt16 = 0o750

    public init() {}

    /// The largest uid or gid a user can have: 2^32 - 1 is `(uid_t)-1`, "no id".
    public static let largestID = 4_294_967_294

    /// Parses login.defs text: "KEY value" lines, `#` comments. Only the keys above are
    /// read; a present but non-numeric value is an error (useradd would misbehave too).
    public init(text: String, path: String = "/etc/login.defs") throws(AccountsError) {
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters()
            guard !line.isEmpty, !line.hasPrefix("#") else { continue }
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard parts.count >= 2 else { continue }
            let key = String(parts[0]), value = String(parts[1])
            func number(radix: Int = 10, orNone: Bool = false) throws(AccountsError) -> Int {
                // -1: "no limit", for the aging keys (shadow-utils writes an empty field).
                if orNone, value == "-1" { return -1 }
                let digits = radix == 8 && value.hasPrefix("0") && value.count > 1 ? String(value.dropFirst()) : value
                guard let n = Int(digits, radix: radix), n >= 0 else {
                    throw AccountsError(.malformedFile,
                        "\(path) line \(index + 1): \(key) \"\(value)\" is not a number")
                }
                return n
            }
            // An id above the largest a Linux id can be (2^32 - 2; 2^32 - 1 is (uid_t)-1)
            // is that largest one: ids are allocated below it.
            func id() throws(AccountsError) -> Int { min(try number(), Self.largestID) }
            switch key {
            case "UID_MIN": uidMin = try id()
            case "UID_MAX": uidMax = try id()
            case "GID_MIN": gidMin = try id()
            case "GID_MAX": gidMax = try id()
            case "PASS_MIN_DAYS": passMinDays = try number(orNone: true)
            case "PASS_MAX_DAYS": passMaxDays = try number(orNone: true)
            case "PASS_WARN_AGE": passWarnAge = try number(orNone: true)
            case "HOME_MODE": homeMode = UInt16(try number(radix: 8) & 0o7777)
            default: continue
            }
        }
        guard uidMin <= uidMax, gidMin <= gidMax else {
            throw AccountsError(.malformedFile,
                "\(path): UID_MIN/GID_MIN above UID_MAX/GID_MAX (\(uidMin)–\(uidMax), \(gidMin)–\(gidMax))")
        }
    }
}

extension StringProtocol {
    func trimmingCharacters() -> String {
        String(drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
    }
}
