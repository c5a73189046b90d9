/// What injection did to one user. `generatedPassword` is the only place a plaintext
/// password exists after injection: show it once, export it, and drop it. The
/// descriptions below leave it out so a stray `print(report)` or log line cannot leak it.
public struct InjectedUser: Sendable, Equatable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    public var name: String
    public var uid: Int
    public var gid: Int
    public var home: String
    public var shell: String
    /// The shadow field written: a crypt hash, or "!" for a locked account.
    public var hash: String
    public var generatedPassword: String?
    /// true for a new user (useradd), false when an existing one was updated (usermod).
    public var created: Bool
    /// Whether the home directory was created now (with a copy of /etc/skel).
    public var homeCreated: Bool
    public var sshKeys: Int

    public var description: String {
        "\(name) uid=\(uid) gid=\(gid) home=\(home) \(created ? "created" : "updated")"
            + (generatedPassword == nil ? "" : " password=<generated, not shown>")
    }
    public var debugDescription: String { description }
    public var customMirror: Mirror {
        Mirror(self, children: ["name": name, "uid": uid, "gid": gid, "home": home, "hash": hash,
                                "created": created], displayStyle: .struct)
    }
}

/// The outcome of one injection: where, into what, and per user.
public struct InjectionReport: Sendable, Equatable, CustomStringConvertible {
    public var target: String
    public var partition: Int
    /// Byte offset of the partition inside the target.
    public var offset: UInt64
    public var filesystem: FilesystemProbe.Kind
    public var label: String
    public var users: [InjectedUser]
    /// Files written inside the filesystem (new /etc files, their `-` backups, homes).
    public var filesWritten: [String]

    public var description: String {
        "\(target) partition \(partition) (\(filesystem.rawValue)\(label.isEmpty ? "" : " \"\(label)\""), offset \(offset)): "
            + users.map(\.description).joined(separator: "; ")
    }
}
