import Foundation

/// Everything an injection will write, worked out in memory from what the filesystem
/// holds now. Only after the whole plan exists (every /etc file parsed, every user
/// applied, every hash made, free space checked) is the first byte written.
struct InjectionPlan {
    enum Operation {
        case file(path: String, contents: [UInt8], permissions: UInt16, uid: UInt32, gid: UInt32)
        case directory(path: String, permissions: UInt16, uid: UInt32, gid: UInt32)
        case symlink(path: String, target: String, uid: UInt32, gid: UInt32)

        var path: String {
            switch self {
            case .file(let p, _, _, _, _), .directory(let p, _, _, _), .symlink(let p, _, _, _): p
            }
        }
    }

    var operations: [Operation] = []
    var users: [InjectedUser] = []

    /// Blocks and inodes the operations can take at most: data blocks rounded up, plus one
    /// per object for an extent or directory block that may have to grow, plus slack for
    /// the directories they are linked into.
    func worstCase(blockSize: Int) -> (blocks: UInt64, inodes: UInt64) {
        var blocks: UInt64 = 8
        var inodes: UInt64 = 0
        for op in operations {
            inodes += 1
            switch op {
            case .file(_, let contents, _, _, _):
                blocks += UInt64((contents.count + blockSize - 1) / blockSize) + 1
            case .directory: blocks += 2
            case .symlink(_, let target, _, _): blocks += target.utf8.count < 60 ? 1 : 2
            }
        }
        return (blocks, inodes)
    }

    /// Checks every path the operations touch, so a write cannot fail halfway on
    /// something visible now: a home that is a file, a symlinked /etc/shadow, a parent
    /// directory that neither exists nor is made by an earlier operation.
    func preflight(_ fs: Ext2Filesystem) throws(AccountsError) {
        let directory = UInt16(0o040000), regular = UInt16(0o100000), symlink = UInt16(0o120000)
        // What the operations before make, by path and type: a parent made by one of them must
        // be a directory too (a skel .ssh that is a file, or a symlink the keys would go
        // through, is refused here, before anything is written).
        var made: [String: UInt16] = [:]
        for operation in operations {
            let path = operation.path
            let parent = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
            var parentType: UInt16? = directory
            if let type = made[parent] { parentType = type } else if !parent.isEmpty { parentType = try fs.fileType(at: parent) }
            if parentType != directory {
                throw AccountsError(.filesystem, "\(parent) in \(fs.source) is not a directory (a file or a symlink); cannot create \(path)")
            }
            let existing = try made[path] != nil ? nil : fs.fileType(at: path)
            switch operation {
            case .file:
                if let existing, existing != regular {
                    throw AccountsError(.filesystem, """
                        \(path) in \(fs.source) exists but is not a regular file (a symlink or directory?); \
                        fix the image: it must be a plain file
                        """)
                }
            case .directory:
                if let existing, existing != directory {
                    throw AccountsError(.filesystem, "\(path) in \(fs.source) exists but is not a directory")
                }
            case .symlink:
                if existing != nil {
                    throw AccountsError(.filesystem, "\(path) in \(fs.source) already exists; cannot place the skel symlink")
                }
            }
            switch operation {
            case .file: made[path] = regular
            case .directory: made[path] = directory
            case .symlink: made[path] = symlink
            }
        }
    }

    static func build(filesystem fs: Ext2Filesystem, users specs: [UserSpec], hashMethod: HashMethod,
                      now: Date) throws(AccountsError) -> InjectionPlan {
        var seen = Set<String>()
        for spec in specs where !seen.insert(spec.name).inserted {
            throw AccountsError(.invalidSpec, "user \(spec.name) is listed twice; merge the two entries")
        }
        func text(_ path: String, required: Bool) throws(AccountsError) -> String? {
            guard let bytes = try fs.readFile(path) else {
                if required {
                    throw AccountsError(.malformedFile,
                        "\(path) is missing in \(fs.source): is this partition really a root filesystem?")
                }
                return nil
            }
            guard let text = String(validating: bytes, as: UTF8.self) else {
                throw AccountsError(.malformedFile, "\(path) in \(fs.source) is not valid UTF-8 text")
            }
            return text
        }
        let originals = [
            "/etc/passwd": try text("/etc/passwd", required: true),
            "/etc/shadow": try text("/etc/shadow", required: true),
            "/etc/group": try text("/etc/group", required: true),
            "/etc/gshadow": try text("/etc/gshadow", required: false),
        ]
        let loginDefs = try text("/etc/login.defs", required: false).map { t throws(AccountsError) in
            try LoginDefs(text: t)
        } ?? LoginDefs()
        var database = try AccountDatabase(passwd: originals["/etc/passwd"]!!, shadow: originals["/etc/shadow"]!!,
                                           group: originals["/etc/group"]!!, gshadow: originals["/etc/gshadow"]!,
                                           loginDefs: loginDefs)
        let today = Int((now.timeIntervalSince1970 / 86_400).rounded(.down))
        let defaultShell = try fs.lookup("/bin/bash") != nil ? "/bin/bash" : "/bin/sh"
        let skel = try SkeletonTree.read(from: fs)

        var plan = InjectionPlan()
        var homeOperations: [Operation] = []
        for spec in specs {
            var generated: String?
            let hash: String
            switch spec.password {
            case .hash(let given):
                try HashFormat.validate(given)
                hash = given
            case .generate(let policy):
                generated = try policy.generate()
                hash = try PasswordHasher.hash(generated!, method: hashMethod)
            case .locked:
                hash = "!"
            }
            let applied = try database.apply(spec, hash: hash, today: today, defaultShell: defaultShell)
            if spec.shell != nil || applied.created, try fs.lookup(applied.shell) == nil {
                throw AccountsError(.invalidSpec,
                    "shell \(applied.shell) of \(spec.name) does not exist in the image; the user could not log in")
            }
            guard let uid = UInt32(exactly: applied.uid), let gid = UInt32(exactly: applied.gid) else {
                throw AccountsError(.invalidSpec, "\(spec.name) would get uid \(applied.uid), gid \(applied.gid): not a Linux id")
            }
            let homeExists = try fs.lookup(applied.home) != nil
            if !homeExists {
                // Parents like /home are made root-owned 0755, as useradd does.
                var parent = ""
                for component in applied.home.split(separator: "/").dropLast() {
                    parent += "/" + component
                    if try fs.lookup(parent) == nil {
                        homeOperations.append(.directory(path: parent, permissions: 0o755, uid: 0, gid: 0))
                    }
                }
                homeOperations.append(.directory(path: applied.home, permissions: loginDefs.homeMode, uid: uid, gid: gid))
                homeOperations += skel.operations(into: applied.home, uid: uid, gid: gid)
            }
            if !spec.sshKeys.isEmpty {
                let sshDirectory = applied.home + "/.ssh", keysPath = sshDirectory + "/authorized_keys"
                switch homeExists ? nil : skel.item(".ssh") {
                case .file?:
                    throw AccountsError(.invalidSpec, "/etc/skel/.ssh in \(fs.source) is a file: \(spec.name)'s SSH keys cannot go into a new home's .ssh; make it a directory in the image, or remove it")
                case .symlink(_, let target)?:
                    throw AccountsError(.invalidSpec, "/etc/skel/.ssh in \(fs.source) is a symlink (to \(target)): \(spec.name)'s SSH keys would be written where it points; make it a directory in the image, or remove it")
                default: break
                }
                if homeExists ? try fs.lookup(sshDirectory) == nil : !skel.contains(".ssh") {
                    homeOperations.append(.directory(path: sshDirectory, permissions: 0o700, uid: uid, gid: gid))
                }
                let existing = homeExists ? try text(keysPath, required: false) ?? "" : ""
                homeOperations.append(.file(path: keysPath, contents: Array(Self.merge(keys: spec.sshKeys, into: existing).utf8),
                                            permissions: 0o600, uid: uid, gid: gid))
            }
            plan.users.append(InjectedUser(name: applied.name, uid: applied.uid, gid: applied.gid, home: applied.home,
                                           shell: applied.shell, hash: hash, generatedPassword: generated,
                                           created: applied.created, homeCreated: !homeExists,
                                           sshKeys: spec.sshKeys.count))
        }
        plan.operations = homeOperations

        // /etc last: a failure while making homes leaves the account files as they were.
        let shadowGid = UInt32(database.group(named: "shadow")?.gid ?? 0)
        let shadowMode: UInt16 = database.group(named: "shadow") == nil ? 0o600 : 0o640
        let rendered: [(String, String?, UInt16, UInt32)] = [
            ("/etc/passwd", database.passwd.rendered(), 0o644, 0),
            ("/etc/group", database.group.rendered(), 0o644, 0),
            ("/etc/shadow", database.shadow.rendered(), shadowMode, shadowGid),
            ("/etc/gshadow", database.gshadow?.rendered(), shadowMode, shadowGid),
        ]
        for (path, new, mode, gid) in rendered {
            guard let new, let old = originals[path]!, new != old else { continue }
            // Like shadow-utils: the previous contents become "passwd-" etc., same mode and owner.
            plan.operations.append(.file(path: path + "-", contents: Array(old.utf8), permissions: mode, uid: 0, gid: gid))
            plan.operations.append(.file(path: path, contents: Array(new.utf8), permissions: mode, uid: 0, gid: gid))
        }
        return plan
    }

    /// Keeps every line already in authorized_keys and appends the keys not yet there, so
    /// re-provisioning never locks out a key someone added by hand.
    static func merge(keys: [String], into existing: String) -> String {
        var text = existing
        if !text.isEmpty && !text.hasSuffix("\n") { text += "\n" }
        let present = Set(existing.split(separator: "\n").map { $0.trimmingCharacters() })
        for key in keys where !present.contains(key.trimmingCharacters()) {
            text += key.trimmingCharacters() + "\n"
        }
        return text
    }
}
