/// Typed views of one record in each account file. Each keeps the fields it does not
/// name (`extra`) so rendering it back loses nothing.

/// `/etc/passwd`: name:password:uid:gid:gecos:home:shell
public struct PasswdEntry: Sendable, Equatable {
    public var name: String
    public var password: String
    public var uid: Int
    public var gid: Int
    public var gecos: String
    public var home: String
    public var shell: String
    public var extra: [String] = []

    public init(name: String, password: String = "x", uid: Int, gid: Int, gecos: String,
                home: String, shell: String) {
        self.name = name; self.password = password; self.uid = uid; self.gid = gid
        self.gecos = gecos; self.home = home; self.shell = shell
    }

    init(fields f: [String], file: String, line: Int) throws(AccountsError) {
        name = f[0]; password = f[1]
        uid = try numeric(f[2], "uid", file, line, max: LoginDefs.largestID)
        gid = try numeric(f[3], "gid", file, line, max: LoginDefs.largestID)
        gecos = f[4]; home = f[5]; shell = f[6]; extra = Array(f.dropFirst(7))
    }

    var fields: [String] { [name, password, String(uid), String(gid), gecos, home, shell] + extra }
}

/// `/etc/shadow`: name:hash:lastchg:min:max:warn:inactive:expire:reserved
/// Numeric fields stay strings: empty means "not set", and that distinction must survive.
public struct ShadowEntry: Sendable, Equatable {
    public var name: String
    public var hash: String
    public var lastChange: String
    public var minimumDays: String
    public var maximumDays: String
    public var warnDays: String
    public var inactiveDays: String
    public var expireDate: String
    public var reserved: String
    public var extra: [String] = []

    public init(name: String, hash: String, lastChange: Int, minimumDays: String = "0",
                maximumDays: String = "99999", warnDays: String = "7") {
        self.name = name; self.hash = hash; self.lastChange = String(lastChange)
        self.minimumDays = minimumDays; self.maximumDays = maximumDays; self.warnDays = warnDays
        inactiveDays = ""; expireDate = ""; reserved = ""
    }

    init(fields f: [String], file: String, line: Int) throws(AccountsError) {
        name = f[0]; hash = f[1]
        for (i, label) in [(2, "last change"), (3, "minimum age"), (4, "maximum age"),
                           (5, "warning period"), (6, "inactivity period"), (7, "expiry date")]
        where !f[i].isEmpty {
            _ = try numeric(f[i], label, file, line)
        }
        lastChange = f[2]; minimumDays = f[3]; maximumDays = f[4]; warnDays = f[5]
        inactiveDays = f[6]; expireDate = f[7]; reserved = f[8]; extra = Array(f.dropFirst(9))
    }

    var fields: [String] {
        [name, hash, lastChange, minimumDays, maximumDays, warnDays, inactiveDays, expireDate,
         reserved] + extra
    }
}

/// `/etc/group`: name:password:gid:member,member
public struct GroupEntry: Sendable, Equatable {
    public var name: String
    public var password: String
    public var gid: Int
    public var members: [String]
    public var extra: [String] = []

    public init(name: String, gid: Int, members: [String] = []) {
        self.name = name; password = "x"; self.gid = gid; self.members = members
    }

    init(fields f: [String], file: String, line: Int) throws(AccountsError) {
        name = f[0]; password = f[1]
        gid = try numeric(f[2], "gid", file, line, max: LoginDefs.largestID)
        members = memberList(f[3]); extra = Array(f.dropFirst(4))
    }

    var fields: [String] { [name, password, String(gid), members.joined(separator: ",")] + extra }
}

/// `/etc/gshadow`: name:password:admin,admin:member,member
public struct GShadowEntry: Sendable, Equatable {
    public var name: String
    public var password: String
    public var administrators: [String]
    public var members: [String]
    public var extra: [String] = []

    public init(name: String, members: [String] = []) {
        self.name = name; password = "!"; administrators = []; self.members = members
    }

    init(fields f: [String]) {
        name = f[0]; password = f[1]
        administrators = memberList(f[2]); members = memberList(f[3]); extra = Array(f.dropFirst(4))
    }

    var fields: [String] {
        [name, password, administrators.joined(separator: ","), members.joined(separator: ",")] + extra
    }
}

func memberList(_ field: String) -> [String] {
    field.isEmpty ? [] : field.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
}

func numeric(_ text: String, _ what: String, _ file: String, _ line: Int, max: Int = .max) throws(AccountsError) -> Int {
    guard !text.isEmpty, text.allSatisfy({ $0.isASCII && $0.isNumber }), let value = Int(text) else {
        throw AccountsError(.malformedFile,
            "\(file) line \(line): \(what) \"\(text)\" is not a non-negative number; fix that line")
    }
    guard value <= max else {
        throw AccountsError(.malformedFile,
            "\(file) line \(line): \(what) \(text) is above \(max), the largest a Linux \(what) can be; fix that line")
    }
    return value
}
