/// One user the profile or inventory wants on a unit. Fields left nil keep what the image
/// has for an existing user, or take useradd's defaults for a new one.
///
/// The rules a value must follow live here and nowhere else: `provision config check`, the
/// daemon's start and reload (through the profile and inventory parsers) and the injector
/// itself all call `check()`, so a value the config check passes cannot fail at injection
/// for its form — only for what the image holds (a missing group or shell, a taken uid).
public struct UserSpec: Sendable, Equatable {
    public var name: String
    /// Fixed uid; nil allocates like useradd (above the highest in UID_MIN…UID_MAX).
    public var uid: Int?
    /// Supplementary groups. The user is added to each (existing membership is kept, like
    /// `usermod -a -G`): provisioning must not silently drop memberships the image set up.
    public var groups: [String]
    /// Create supplementary groups the image lacks instead of failing like useradd does.
    public var createMissingGroups: Bool
    public var shell: String?
    public var gecos: String?
    public var home: String?
    public var password: PasswordSource
    /// OpenSSH public key lines for `~/.ssh/authorized_keys`.
    public var sshKeys: [String]
    /// Allows a uid in a reserved range (0, the system range 1–999, systemd's dynamic users,
    /// nobody). Off by default: `uid = 0` on a lab user is a second root account, which is
    /// far more often a typo than a wish. The profile and inventory key is `allow_system_uid`.
    public var allowSystemUID: Bool

    public init(name: String, uid: Int? = nil, groups: [String] = [], createMissingGroups: Bool = false,
                shell: String? = nil, gecos: String? = nil, home: String? = nil,
                password: PasswordSource, sshKeys: [String] = [], allowSystemUID: Bool = false) {
        self.name = name; self.uid = uid; self.groups = groups
        self.createMissingGroups = createMissingGroups; self.shell = shell; self.gecos = gecos
        self.home = home; self.password = password; self.sshKeys = sshKeys
        self.allowSystemUID = allowSystemUID
    }

    /// A value that breaks a rule: which field (and which element of a list), and why.
    /// The message reads after the field's name: `home: must not contain a ".." component …`.
    public struct Problem: Error, Sendable, Equatable, CustomStringConvertible {
        public enum Field: String, Sendable {
            case name, uid, groups, shell, gecos, home, password
            case sshKeys = "ssh_keys"
        }
        public var field: Field
        /// The element of `groups` or `sshKeys`.
        public var index: Int?
        public var message: String
        /// A pre-made hash that is not accepted (`AccountsError.Code.invalidHash`); the
        /// others are `.invalidSpec`.
        public var isHash: Bool { field == .password }

        public var description: String { "\(field.rawValue)\(index.map { "[\($0)]" } ?? ""): \(message)" }
    }

    /// Every rule, in field order; empty when the spec is fine.
    public func problems() -> [Problem] {
        var found: [Problem] = []
        if let message = Self.nameProblem(name) { found.append(Problem(field: .name, message: message)) }
        if let uid, let message = Self.uidProblem(uid, allowSystemUID: allowSystemUID) {
            found.append(Problem(field: .uid, message: message))
        }
        var seenGroups: Set<String> = []
        for (index, group) in groups.enumerated() {
            if let message = Self.nameProblem(group) {
                found.append(Problem(field: .groups, index: index, message: message))
            } else if !seenGroups.insert(group).inserted {
                found.append(Problem(field: .groups, index: index, message: "group \"\(group)\" is listed twice"))
            }
        }
        if let shell, let message = Self.pathProblem(shell) { found.append(Problem(field: .shell, message: message)) }
        if let gecos, let message = Self.gecosProblem(gecos) { found.append(Problem(field: .gecos, message: message)) }
        if let home, let message = Self.pathProblem(home) { found.append(Problem(field: .home, message: message)) }
        switch password {
        case .hash(let hash):
            do throws(AccountsError) { try HashFormat.validate(hash) } catch { found.append(Problem(field: .password, message: error.message)) }
        case .generate, .locked:
            // A generation policy is the inventory's setting, checked where it is read.
            break
        }
        for (index, key) in sshKeys.enumerated() {
            if let message = Self.sshKeyProblem(key) { found.append(Problem(field: .sshKeys, index: index, message: message)) }
        }
        return found
    }

    /// Throws the first problem, as `Problem` (callers that know where each field was written
    /// map it to a file and line).
    public func check() throws(Problem) {
        if let first = problems().first { throw first }
    }

    /// Rejects what would corrupt passwd/group or confuse login: `check()` as an AccountsError.
    public func validate() throws(AccountsError) {
        do throws(Problem) { try check() } catch {
            throw AccountsError(error.isHash ? .invalidHash : .invalidSpec, "user \(Self.visible(name)): \(error)")
        }
    }

    // MARK: - The rules, one function each

    /// useradd's default NAME_REGEX: lower-case letter or '_' first, then letters, digits,
    /// '_', '-', optionally a trailing '$' (machine accounts); at most 32 characters. This
    /// also keeps out ':', ',', newlines and NULs, which would split passwd and group lines.
    public static func nameProblem(_ name: String) -> String? {
        let chars = Array(name.unicodeScalars)
        let ok = !chars.isEmpty && chars.count <= 32
            && chars.enumerated().allSatisfy { i, c in
                switch c {
                case "a"..."z", "_": true
                case "0"..."9", "-": i > 0
                case "$": i == chars.count - 1 && i > 0
                default: false
                }
            }
        guard !ok else { return nil }
        return "\"\(visible(name))\" is not a valid name: use lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters"
    }

    /// Ids no lab account should get by accident. 65535 and 4294967295 are the 16- and 32-bit
    /// "-1" that chown(2) and setuid(2) read as "no change": never valid.
    public static let systemUIDRanges: [ClosedRange<Int>] = [
        0...0,            // root
        1...999,          // system accounts (Debian's SYS_UID_MIN…SYS_UID_MAX, login.defs' default UID_MIN is 1000)
        61184...65519,    // systemd's DynamicUser= range
        65534...65534,    // nobody
    ]

    public static func uidProblem(_ uid: Int, allowSystemUID: Bool) -> String? {
        guard uid >= 0, uid <= 4_294_967_294, uid != 65535 else {
            return "\(uid) is not a usable uid (0–4294967294, and not 65535)"
        }
        guard !allowSystemUID, let range = systemUIDRanges.first(where: { $0.contains(uid) }) else { return nil }
        let what = switch range.lowerBound {
        case 0: "root's uid: this would make a second root account"
        case 1: "in the system range 1–999"
        case 65534: "nobody's uid"
        default: "in systemd's dynamic-user range 61184–65519"
        }
        return "\(uid) is \(what); leave uid out to allocate one like useradd, or set allow_system_uid = true if this is meant"
    }

    /// Home directories and shells: absolute, normalised paths. A ".." component
    /// (`/home/../../etc`) would put the user's home — and its authorized_keys, owned by the
    /// user — somewhere else entirely; ':' or a newline would split the passwd line.
    public static func pathProblem(_ path: String) -> String? {
        if let bad = forbidden(in: path, also: [":"]) {
            return "\"\(visible(path))\" contains \(bad), which would break /etc/passwd"
        }
        guard path.hasPrefix("/") else { return "\"\(path)\" must be an absolute path" }
        guard path.utf8.count < 4096 else { return "is longer than PATH_MAX (4096 bytes)" }
        guard path != "/" else { return nil }
        let components = path.dropFirst().split(separator: "/", omittingEmptySubsequences: false)
        if components.contains(where: { $0 == ".." || $0 == "." }) {
            return "\"\(path)\" must not contain \".\" or \"..\" components: give the plain absolute path"
        }
        if components.contains(where: \.isEmpty) {
            return "\"\(path)\" has an empty component (\"//\" or a trailing \"/\"): give the plain absolute path"
        }
        return nil
    }

    /// GECOS: free text, but ':' splits the passwd line and a newline starts a new one.
    public static func gecosProblem(_ gecos: String) -> String? {
        guard let bad = forbidden(in: gecos, also: [":"]) else { return nil }
        return "\"\(visible(gecos))\" contains \(bad), which would break /etc/passwd"
    }

    /// The key types an authorized_keys line may carry (OpenSSH's list, certificates included).
    public static let sshKeyTypes: Set<String> = [
        "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-ed25519-cert-v01@openssh.com", "ssh-rsa-cert-v01@openssh.com",
        "ecdsa-sha2-nistp256-cert-v01@openssh.com", "ecdsa-sha2-nistp384-cert-v01@openssh.com",
        "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    ]

    /// One authorized_keys line: optional options, a key type, the base64 key, a comment.
    /// A newline inside would add a second line — a second key nobody reviewed.
    public static func sshKeyProblem(_ key: String) -> String? {
        if let bad = forbidden(in: key, also: [], allowTab: true) {
            return "the key contains \(bad): give one key per array element"
        }
        let fields = key.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard let typeIndex = fields.firstIndex(where: { sshKeyTypes.contains(String($0)) }),
              typeIndex + 1 < fields.count,
              fields[typeIndex + 1].allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "+/=".contains($0)) })
        else {
            return "not an SSH public key line (expected e.g. \"ssh-ed25519 AAAA… comment\")"
        }
        return nil
    }

    /// The first character that must never be in a passwd/shadow/group field or an
    /// authorized_keys line, described for an error: control characters (NUL, newline, CR,
    /// and the rest of C0, DEL and C1) and the characters in `also`.
    public static func forbidden(in text: String, also: Set<Character>, allowTab: Bool = false) -> String? {
        for scalar in text.unicodeScalars {
            let v = scalar.value
            if allowTab && v == 0x09 { continue }
            switch v {
            case 0x00: return "a NUL character"
            case 0x0A: return "a newline"
            case 0x0D: return "a carriage return"
            case 0x00...0x1F, 0x7F...0x9F: return "a control character (U+\(String(v, radix: 16, uppercase: true).leftPadded(4)))"
            default: if also.contains(Character(scalar)) { return "'\(Character(scalar))'" }
            }
        }
        return nil
    }

    /// `text` with control characters escaped, so an error message shows them instead of
    /// breaking the line it is printed on.
    public static func visible(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar.value {
            case 0x00: out += "\\0"
            case 0x09: out += "\\t"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x00...0x1F, 0x7F...0x9F: out += "\\u{\(String(scalar.value, radix: 16))}"
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}

extension String {
    func leftPadded(_ width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}

/// Where a user's password comes from.
public enum PasswordSource: Sendable, Equatable {
    /// A pre-made crypt hash (`$6$`, `$y$`, `$5$`, `$2b$`), or `!`/`*` for a locked account.
    case hash(String)
    /// A random password, hashed here and returned once in the report.
    case generate(PasswordPolicy)
    /// No password login (shadow field `!`); SSH keys still work.
    case locked
}
