/// The four account files of one root filesystem, edited together so they stay consistent:
/// a user in passwd is in shadow, a group in group is in gshadow (when the image has one),
/// and supplementary memberships appear in both.
///
/// All edits happen on this value in memory; nothing is written until the caller renders
/// it. Parsing validates every record up front, so a malformed line is reported before
/// any change is attempted.
public struct AccountDatabase: Sendable, Equatable {
    public private(set) var passwd: ColonSeparatedFile
    public private(set) var shadow: ColonSeparatedFile
    public private(set) var group: ColonSeparatedFile
    /// nil when the image has no `/etc/gshadow` (shadow-utils then leaves it alone too).
    public private(set) var gshadow: ColonSeparatedFile?
    public let loginDefs: LoginDefs

    public init(passwd: String, shadow: String, group: String, gshadow: String?,
                loginDefs: LoginDefs = LoginDefs()) throws(AccountsError) {
        self.passwd = try ColonSeparatedFile(path: "/etc/passwd", text: passwd, minimumFields: 7)
        self.shadow = try ColonSeparatedFile(path: "/etc/shadow", text: shadow, minimumFields: 9)
        self.group = try ColonSeparatedFile(path: "/etc/group", text: group, minimumFields: 4)
        self.gshadow = try gshadow.map { text throws(AccountsError) in
            try ColonSeparatedFile(path: "/etc/gshadow", text: text, minimumFields: 4)
        }
        self.loginDefs = loginDefs
        // Typed parsing checks the numeric fields of every record now, not at first use.
        _ = try users()
        _ = try shadowEntries()
        _ = try groups()
    }

    // MARK: Typed views

    public func users() throws(AccountsError) -> [PasswdEntry] {
        var out: [PasswdEntry] = []
        for (i, f) in passwd.records { out.append(try PasswdEntry(fields: f, file: passwd.path, line: i + 1)) }
        return out
    }

    public func shadowEntries() throws(AccountsError) -> [ShadowEntry] {
        var out: [ShadowEntry] = []
        for (i, f) in shadow.records { out.append(try ShadowEntry(fields: f, file: shadow.path, line: i + 1)) }
        return out
    }

    public func groups() throws(AccountsError) -> [GroupEntry] {
        var out: [GroupEntry] = []
        for (i, f) in group.records { out.append(try GroupEntry(fields: f, file: group.path, line: i + 1)) }
        return out
    }

    public func user(named name: String) -> PasswdEntry? {
        guard let i = passwd.index(of: name), case .record(let f) = passwd.lines[i] else { return nil }
        return try? PasswdEntry(fields: f, file: passwd.path, line: i + 1)
    }

    public func shadowEntry(named name: String) -> ShadowEntry? {
        guard let i = shadow.index(of: name), case .record(let f) = shadow.lines[i] else { return nil }
        return try? ShadowEntry(fields: f, file: shadow.path, line: i + 1)
    }

    public func group(named name: String) -> GroupEntry? {
        guard let i = group.index(of: name), case .record(let f) = group.lines[i] else { return nil }
        return try? GroupEntry(fields: f, file: group.path, line: i + 1)
    }

    public func gshadowEntry(named name: String) -> GShadowEntry? {
        guard let gshadow, let i = gshadow.index(of: name), case .record(let f) = gshadow.lines[i] else { return nil }
        return GShadowEntry(fields: f)
    }

    // MARK: useradd / usermod

    /// What `apply` did for one user.
    public struct AppliedUser: Sendable, Equatable {
        public var name: String
        public var uid: Int
        public var gid: Int
        public var home: String
        public var shell: String
        /// False when the user existed and was updated (usermod), true for useradd.
        public var created: Bool
    }

    /// Adds the user like `useradd -U -m` or, when the name exists, updates it like
    /// `usermod -a -G`: nil spec fields keep existing values. `hash` is the final shadow
    /// password field; `today` is days since 1970-01-01 (shadow's last-change field).
    public mutating func apply(_ spec: UserSpec, hash: String, today: Int,
                               defaultShell: String) throws(AccountsError) -> AppliedUser {
        try spec.validate()
        // Check every supplementary group before changing anything: a missing one is an
        // error like useradd's, unless the spec asks for it to be created.
        let missing = spec.groups.filter { group(named: $0) == nil }
        if !missing.isEmpty && !spec.createMissingGroups {
            throw AccountsError(.missingGroup, """
                group\(missing.count > 1 ? "s" : "") \(missing.joined(separator: ", ")) for user \
                \(spec.name) do\(missing.count > 1 ? "" : "es") not exist in the image's /etc/group; \
                remove \(missing.count > 1 ? "them" : "it") from the user's groups or allow creating missing groups
                """)
        }

        var entry: PasswdEntry
        let created: Bool
        if let existing = user(named: spec.name) {
            if let uid = spec.uid, uid != existing.uid {
                throw AccountsError(.conflict, """
                    user \(spec.name) already exists with uid \(existing.uid), not \(uid); changing a uid \
                    would orphan the user's files: drop the uid from the spec or use \(existing.uid)
                    """)
            }
            entry = existing
            if let gecos = spec.gecos { entry.gecos = gecos }
            if let home = spec.home { entry.home = home }
            if let shell = spec.shell { entry.shell = shell }
            created = false
        } else {
            if group(named: spec.name) != nil {
                throw AccountsError(.conflict, """
                    group \(spec.name) already exists in /etc/group but user \(spec.name) does not; \
                    useradd refuses to reuse it as a private group: rename the user or remove the group
                    """)
            }
            let users = try users()
            let uid: Int
            if let wanted = spec.uid {
                if let owner = users.first(where: { $0.uid == wanted }) {
                    throw AccountsError(.conflict, "uid \(wanted) for \(spec.name) is already used by \(owner.name)")
                }
                uid = wanted
            } else {
                uid = try Self.allocate(used: Set(users.map(\.uid)), min: loginDefs.uidMin,
                                        max: loginDefs.uidMax, what: "uid")
            }
            let usedGids = Set(try groups().map(\.gid))
            // useradd gives the private group the user's number when it is free.
            let gid = usedGids.contains(uid)
                ? try Self.allocate(used: usedGids, min: loginDefs.gidMin, max: loginDefs.gidMax, what: "gid")
                : uid
            addGroup(GroupEntry(name: spec.name, gid: gid))
            entry = PasswdEntry(name: spec.name, uid: uid, gid: gid, gecos: spec.gecos ?? "",
                                home: spec.home ?? "/home/\(spec.name)", shell: spec.shell ?? defaultShell)
            created = true
        }
        passwd.put(entry.fields, at: passwd.index(of: spec.name))

        var shadowEntry = shadowEntry(named: spec.name)
            ?? ShadowEntry(name: spec.name, hash: hash, lastChange: today,
                           minimumDays: Self.agingField(loginDefs.passMinDays),
                           maximumDays: Self.agingField(loginDefs.passMaxDays),
                           warnDays: Self.agingField(loginDefs.passWarnAge))
        shadowEntry.hash = hash
        shadowEntry.lastChange = String(today)
        shadow.put(shadowEntry.fields, at: shadow.index(of: spec.name))

        for name in spec.groups {
            if group(named: name) == nil {
                let used = Set(try groups().map(\.gid))
                let gid = try Self.allocate(used: used, min: loginDefs.gidMin, max: loginDefs.gidMax, what: "gid")
                addGroup(GroupEntry(name: name, gid: gid))
            }
            addMember(spec.name, to: name)
        }
        return AppliedUser(name: entry.name, uid: entry.uid, gid: entry.gid, home: entry.home,
                           shell: entry.shell, created: created)
    }

    private mutating func addGroup(_ entry: GroupEntry) {
        group.put(entry.fields, at: nil)
        if gshadow != nil, gshadowEntry(named: entry.name) == nil {
            gshadow!.put(GShadowEntry(name: entry.name).fields, at: nil)
        }
    }

    private mutating func addMember(_ user: String, to name: String) {
        if var entry = group(named: name), !entry.members.contains(user) {
            entry.members.append(user)
            group.put(entry.fields, at: group.index(of: name))
        }
        guard gshadow != nil else { return }
        // grpck wants every group in gshadow too; an image missing one gets it added.
        var shadowGroup = gshadowEntry(named: name) ?? GShadowEntry(name: name)
        if !shadowGroup.members.contains(user) {
            shadowGroup.members.append(user)
        }
        gshadow!.put(shadowGroup.fields, at: gshadow!.index(of: name))
    }

    /// A login.defs aging value as shadow holds it: -1 ("no limit") is an empty field.
    static func agingField(_ days: Int) -> String { days < 0 ? "" : String(days) }

    /// shadow-utils' find_new_uid: one above the highest id in use within [min, max];
    /// when that passes max, the lowest free id in the range. `max` is at most
    /// `LoginDefs.largestID` (login.defs clamps it), so `next` cannot overflow.
    static func allocate(used: Set<Int>, min: Int, max: Int, what: String) throws(AccountsError) -> Int {
        let inRange = used.filter { $0 >= min && $0 <= max }
        let next = (inRange.max() ?? (min - 1)) + 1
        if next <= max { return next }
        if let free = (min...max).first(where: { !used.contains($0) }) { return free }
        throw AccountsError(.conflict, "no free \(what) left between \(min) and \(max) (login.defs)")
    }
}
