/// One user the profile or inventory wants on a unit. Fields left nil keep what the image
/// has for an existing user, or take useradd's defaults for a new one.
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

    public init(name: String, uid: Int? = nil, groups: [String] = [], createMissingGroups: Bool = false,
                shell: String? = nil, gecos: String? = nil, home: String? = nil,
                password: PasswordSource, sshKeys: [String] = []) {
        self.name = name; self.uid = uid; self.groups = groups
        self.createMissingGroups = createMissingGroups; self.shell = shell; self.gecos = gecos
        self.home = home; self.password = password; self.sshKeys = sshKeys
    }

    /// Rejects what would corrupt passwd/group or confuse login: the checks useradd makes.
    func validate() throws(AccountsError) {
        try Self.validateName(name, what: "user name")
        for group in groups { try Self.validateName(group, what: "group name") }
        if let uid, uid < 0 || uid > 4_294_967_294 {
            throw AccountsError(.invalidSpec, "uid \(uid) for \(name) is out of range (0–4294967294)")
        }
        if let gecos, gecos.contains(where: { $0 == ":" || $0 == "\n" || $0 == "\r" }) {
            throw AccountsError(.invalidSpec, "GECOS of \(name) contains ':' or a newline")
        }
        for (what, path) in [("shell", shell), ("home", home)] {
            guard let path else { continue }
            guard path.hasPrefix("/"), !path.contains(where: { $0 == ":" || $0 == "\n" || $0 == "\r" }),
                  !path.split(separator: "/").contains("..") else {
                throw AccountsError(.invalidSpec,
                    "\(what) \"\(path)\" of \(name) must be an absolute path without ':', newlines or '..'")
            }
        }
        for key in sshKeys where key.contains(where: { $0 == "\n" || $0 == "\r" }) || key.isEmpty {
            throw AccountsError(.invalidSpec, "an SSH key of \(name) is empty or spans several lines")
        }
    }

    /// useradd's default NAME_REGEX: lower-case letter or '_' first, then letters, digits,
    /// '_', '-', optionally a trailing '$' (machine accounts); at most 32 characters.
    static func validateName(_ name: String, what: String) throws(AccountsError) {
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
        guard ok else {
            throw AccountsError(.invalidSpec,
                "\(what) \"\(name)\" is not valid: use lower-case letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters")
        }
    }
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
