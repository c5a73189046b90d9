import Foundation
import TOMLKit

/// The operator's inventory: which users every unit gets, and per-unit overrides keyed by
/// card serial, slot name or running sequence number. TOML; see INVENTORY.md beside this
/// file for the full format. In short:
///
/// ```toml
/// name_pattern = "lab-{seq:03}"          # {seq}, {seq:0N}, {serial}, {slot}
/// password_export = "/var/lib/provision/passwords.tsv"
/// hash = "sha512"                         # or "yescrypt"
/// [password_policy]
/// length = 20
/// [[users]]
/// name = "lab"
/// groups = ["sudo"]
/// password = "generate"                   # "generate", "locked" or a crypt hash
/// ssh_keys = ["ssh-ed25519 AAAA… op@bench"]
/// [serial."3a5f0c21".users.lab]
/// password = "$6$…"
/// [slot."usb-1.2"]
/// name = "bench-camera"
/// [seq.7.users.guest]
/// password = "locked"
/// ```
///
/// Overrides stack from the least to the most specific: sequence, then slot, then serial.
/// The running sequence number is the caller's (the daemon's ledger counts units);
/// the inventory file is only read, never written.
public struct Inventory: Sendable, Equatable {
    public var namePattern: String
    public var passwordExport: String?
    public var hashMethod: HashMethod
    public var passwordPolicy: PasswordPolicy
    public var users: [UserSpec]
    var overrides: [String: [String: UnitOverride]]

    struct File: Decodable {
        var name_pattern: String?
        var password_export: String?
        var hash: String?
        var sha512_rounds: Int?
        var yescrypt_cost: Int?
        var password_policy: Policy?
        var users: [User]?
        var serial: [String: UnitOverride]?
        var slot: [String: UnitOverride]?
        var seq: [String: UnitOverride]?
    }

    struct Policy: Decodable { var length: Int?; var alphabet: String? }

    struct User: Decodable, Equatable {
        var name: String?
        var uid: Int?
        var groups: [String]?
        var create_missing_groups: Bool?
        var shell: String?
        var gecos: String?
        var home: String?
        var password: String?
        var ssh_keys: [String]?
        var allow_system_uid: Bool?
    }

    struct UnitOverride: Decodable, Equatable, Sendable {
        var name: String?
        /// Per-user changes keyed by user name; a name not among the defaults adds a user.
        var users: [String: User]?
    }

    public static func load(path: String) throws(AccountsError) -> Inventory {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw AccountsError(.inventory, "cannot read the inventory \(path): \(error.localizedDescription)")
        }
        return try Inventory(toml: text, path: path)
    }

    public init(toml: String, path: String = "inventory") throws(AccountsError) {
        // toml++ reads a C string: a NUL would silently end the file there, and every user
        // and override after it would be missing without a word.
        if let nul = TOMLNUL.first(in: toml) {
            throw AccountsError(.inventory, "\(path):\(nul.line): \(nul.message)")
        }
        if toml.allSatisfy(\.isWhitespace) {
            throw AccountsError(.inventory, "\(path) is empty; give it [[users]] or a name_pattern, or remove the station's inventory setting")
        }
        let file: File
        do {
            try Self.rejectUnknownKeys(TOMLTable(string: toml), path: path)
            file = try TOMLDecoder().decode(File.self, from: toml)
        } catch let error as AccountsError {
            throw error
        } catch {
            throw AccountsError(.inventory, "\(path) is not a valid inventory: \(error)")
        }
        namePattern = file.name_pattern ?? "unit-{seq:03}"
        passwordExport = file.password_export
        switch file.hash ?? "sha512" {
        case "sha512": hashMethod = .sha512(rounds: file.sha512_rounds)
        case "yescrypt": hashMethod = .yescrypt(cost: file.yescrypt_cost)
        case let other:
            throw AccountsError(.inventory, "\(path): hash \"\(other)\" is not supported; use \"sha512\" or \"yescrypt\"")
        }
        // The ranges PasswordHasher enforces, checked now rather than at the first generated password.
        if let rounds = file.sha512_rounds, !(1000...999_999_999).contains(rounds) {
            throw AccountsError(.inventory, "\(path): sha512_rounds must be between 1000 and 999999999, not \(rounds)")
        }
        if let cost = file.yescrypt_cost, !(1...11).contains(cost) {
            throw AccountsError(.inventory, "\(path): yescrypt_cost must be between 1 and 11, not \(cost)")
        }
        passwordPolicy = PasswordPolicy(length: file.password_policy?.length ?? 20,
                                        alphabet: file.password_policy?.alphabet ?? PasswordPolicy.unambiguousAlphabet)
        do throws(AccountsError) { try passwordPolicy.validate() } catch {
            throw AccountsError(.inventory, "\(path): [password_policy]: \(error.message)")
        }
        overrides = ["serial": file.serial ?? [:], "slot": file.slot ?? [:], "seq": file.seq ?? [:]]
        users = []
        for (index, user) in (file.users ?? []).enumerated() {
            guard let name = user.name else {
                throw AccountsError(.inventory, "\(path): user \(index + 1) in [[users]] has no name")
            }
            guard !users.contains(where: { $0.name == name }) else {
                throw AccountsError(.inventory, "\(path): user \(UserSpec.visible(name)) is listed twice in [[users]]; merge the two entries")
            }
            users.append(try Self.spec(name: name, from: user, base: nil, policy: passwordPolicy, path: "\(path): [[users]] \(index + 1)"))
        }
        // Written as the sequence number reads ("7", not "007" or "+7"): overrides are looked
        // up by the number's own digits, and any other spelling would never apply.
        for key in overrides["seq"]!.keys where Int(key).map(String.init) != key {
            throw AccountsError(.inventory, "\(path): [seq.\(UserSpec.visible(key))] is not a sequence number as written (use \(Int(key).map { "[seq.\"\($0)\"]" } ?? "digits only"))")
        }
        try Self.checkUnitName(namePattern, path: path, what: "name_pattern")
        try checkOverrides(path: path)
    }

    /// Every override is checked now, not when its unit arrives: a bad value under
    /// `[serial."…"]` must not wait for that card to be written before it shows.
    func checkOverrides(path: String) throws(AccountsError) {
        for kind in ["seq", "slot", "serial"] {
            for (key, override) in (overrides[kind] ?? [:]).sorted(by: { $0.key < $1.key }) {
                let table = "[\(kind).\"\(UserSpec.visible(key))\"]"
                if let name = override.name {
                    try Self.checkUnitName(name, path: path, what: "\(table) name")
                }
                for (userName, change) in (override.users ?? [:]).sorted(by: { $0.key < $1.key }) {
                    let context = "\(path): [\(kind).\"\(UserSpec.visible(key))\".users.\(UserSpec.visible(userName))]"
                    let base = users.first { $0.name == userName }
                    // A user added by an override needs a password from some layer; which
                    // layers meet depends on the card, so any layer giving one is enough here.
                    let passwordSomewhere = change.password != nil || base != nil || overrides.values.contains { units in
                        units.values.contains { unit in unit.users?[userName]?.password != nil }
                    }
                    guard passwordSomewhere else {
                        throw AccountsError(.inventory, "\(context): user \(UserSpec.visible(userName)) is not among [[users]] and no override gives it a password (\"generate\", \"locked\" or a crypt hash)")
                    }
                    let placeholder = UserSpec(name: userName, password: .locked)
                    _ = try Self.spec(name: userName, from: change, base: base ?? placeholder, policy: passwordPolicy, path: context)
                }
            }
        }
    }

    /// Unit names go into the ledger, log lines and the tab-separated password export.
    static func checkUnitName(_ pattern: String, path: String, what: String) throws(AccountsError) {
        let sample = try format(pattern, sequence: 1, serial: "s", slot: "s", path: path)
        if let bad = UserSpec.forbidden(in: pattern, also: ["/"]) {
            throw AccountsError(.inventory, "\(path): \(what) \"\(UserSpec.visible(pattern))\" contains \(bad); unit names are one plain line")
        }
        if sample.allSatisfy(\.isWhitespace) {
            throw AccountsError(.inventory, "\(path): \(what) \"\(pattern)\" gives an empty unit name")
        }
    }

    static let fileKeys: Set<String> = ["name_pattern", "password_export", "hash", "sha512_rounds", "yescrypt_cost",
                                        "password_policy", "users", "serial", "slot", "seq"]
    static let userKeys: Set<String> = ["name", "uid", "groups", "create_missing_groups", "shell", "gecos", "home",
                                        "password", "ssh_keys", "allow_system_uid"]

    /// A typo such as `shel = "/bin/zsh"` must be an error, not a silently ignored setting
    /// (Decodable skips keys it does not know).
    static func rejectUnknownKeys(_ table: TOMLTable, path: String) throws(AccountsError) {
        func check(_ table: TOMLTable?, _ allowed: Set<String>, _ context: String) throws(AccountsError) {
            guard let table else { return }
            for key in table.keys where !allowed.contains(key) {
                throw AccountsError(.inventory, "\(path): unknown key \"\(UserSpec.visible(key))\" in \(context); allowed: \(allowed.sorted().joined(separator: ", "))")
            }
        }
        try check(table, fileKeys, "the top level")
        try check(table["password_policy"]?.table, ["length", "alphabet"], "[password_policy]")
        for (index, user) in (table["users"]?.array ?? TOMLArray()).enumerated() {
            try check(user.table, userKeys, "[[users]] \(index + 1)")
        }
        for kind in ["serial", "slot", "seq"] {
            guard let units = table[kind]?.table else { continue }
            for key in units.keys {
                let unit = units[key]?.table
                try check(unit, ["name", "users"], "[\(kind).\"\(UserSpec.visible(key))\"]")
                guard let users = unit?["users"]?.table else { continue }
                for name in users.keys {
                    try check(users[name]?.table, userKeys.subtracting(["name"]), "[\(kind).\"\(UserSpec.visible(key))\".users.\(UserSpec.visible(name))]")
                }
            }
        }
    }

    /// The name and users of one unit.
    public struct Assignment: Sendable, Equatable {
        public var unitName: String
        public var users: [UserSpec]
    }

    public func assignment(serial: String?, slot: String?, sequence: Int) throws(AccountsError) -> Assignment {
        var name = try Self.format(namePattern, sequence: sequence, serial: serial ?? "", slot: slot ?? "", path: "inventory")
        var specs = users
        let layers = [("seq", String(sequence)), ("slot", slot), ("serial", serial)]
        for case let (kind, key?) in layers {
            guard let override = overrides[kind]?[key] else { continue }
            if let newName = override.name {
                name = try Self.format(newName, sequence: sequence, serial: serial ?? "", slot: slot ?? "", path: "inventory")
            }
            for (userName, change) in (override.users ?? [:]).sorted(by: { $0.key < $1.key }) {
                let context = "[\(kind).\"\(UserSpec.visible(key))\".users.\(UserSpec.visible(userName))]"
                if let index = specs.firstIndex(where: { $0.name == userName }) {
                    specs[index] = try Self.spec(name: userName, from: change, base: specs[index],
                                                 policy: passwordPolicy, path: context)
                } else {
                    specs.append(try Self.spec(name: userName, from: change, base: nil,
                                               policy: passwordPolicy, path: context))
                }
            }
        }
        return Assignment(unitName: name, users: specs)
    }

    static func spec(name: String, from user: User, base: UserSpec?, policy: PasswordPolicy,
                     path: String) throws(AccountsError) -> UserSpec {
        let password: PasswordSource
        switch user.password {
        case nil:
            guard let inherited = base?.password else {
                throw AccountsError(.inventory, "\(path): user \(UserSpec.visible(name)) needs a password (\"generate\", \"locked\" or a crypt hash)")
            }
            password = inherited
        case "generate": password = .generate(policy)
        case "locked": password = .locked
        case let hash?:
            do { try HashFormat.validate(hash) } catch {
                throw AccountsError(.inventory, "\(path): user \(UserSpec.visible(name)): \(error.message)")
            }
            password = .hash(hash)
        }
        let spec = UserSpec(name: name, uid: user.uid ?? base?.uid, groups: user.groups ?? base?.groups ?? [],
                            createMissingGroups: user.create_missing_groups ?? base?.createMissingGroups ?? false,
                            shell: user.shell ?? base?.shell, gecos: user.gecos ?? base?.gecos,
                            home: user.home ?? base?.home, password: password,
                            sshKeys: user.ssh_keys ?? base?.sshKeys ?? [],
                            allowSystemUID: user.allow_system_uid ?? base?.allowSystemUID ?? false)
        // The same rules the injector applies (UserSpec.check), so the two cannot drift.
        do throws(UserSpec.Problem) { try spec.check() } catch {
            throw AccountsError(.inventory, "\(path): user \(UserSpec.visible(name)): \(error)")
        }
        return spec
    }

    /// Expands `{seq}`, `{seq:0N}` (zero-padded to N digits), `{serial}` and `{slot}`.
    static func format(_ pattern: String, sequence: Int, serial: String, slot: String,
                       path: String) throws(AccountsError) -> String {
        var out = ""
        var rest = Substring(pattern)
        while let open = rest.firstIndex(of: "{") {
            out += rest[..<open]
            guard let close = rest[open...].firstIndex(of: "}") else {
                throw AccountsError(.inventory, "\(path): name pattern \"\(pattern)\" has an unclosed '{'")
            }
            let token = rest[rest.index(after: open)..<close]
            switch token {
            case "seq": out += String(sequence)
            case "serial": out += serial
            case "slot": out += slot
            default:
                guard token.hasPrefix("seq:0"), let width = Int(token.dropFirst(5)), (1...12).contains(width) else {
                    throw AccountsError(.inventory,
                        "\(path): name pattern \"\(pattern)\" has an unknown placeholder {\(token)}; use {seq}, {seq:03}, {serial} or {slot}")
                }
                let digits = String(sequence)
                out += String(repeating: "0", count: max(0, width - digits.count)) + digits
            }
            rest = rest[rest.index(after: close)...]
        }
        return out + rest
    }
}

/// Where a TOML text holds a NUL: a raw byte, or a `\u0000` escape in a string. toml++ (under
/// TOMLKit) works on C strings, so a raw NUL silently ends the document and an escaped one
/// silently cuts the value short (`"/home/lab\u0000/../etc"` would arrive as `/home/lab`).
/// Both are refused by every TOML reader of the project (station config, profiles, inventory).
public enum TOMLNUL {
    public struct Found: Sendable, Equatable {
        public var line: Int
        public var column: Int
        public var message: String
    }

    public static func first(in text: String) -> Found? {
        let bytes = Array(text.utf8)
        var line = 1, column = 1, index = 0
        while index < bytes.count {
            let byte = bytes[index]
            if byte == 0 {
                return Found(line: line, column: column, message: "contains a NUL byte: a TOML file is text (is this the right file, or a damaged one?)")
            }
            if byte == UInt8(ascii: "\\") {
                // An escape: \\ is a backslash (skip both), \u0000 and \U00000000 are NUL.
                let rest = bytes[(index + 1)...]
                if rest.starts(with: Array("u0000".utf8)) || rest.starts(with: Array("U00000000".utf8)) {
                    return Found(line: line, column: column, message: "a \\u0000 escape (NUL) cannot be part of a value here")
                }
                if rest.first == UInt8(ascii: "\\") { index += 2; column += 2; continue }
            }
            if byte == 0x0A { line += 1; column = 1 } else if byte & 0xC0 != 0x80 { column += 1 }
            index += 1
        }
        return nil
    }
}
