/// The image's /etc/skel, read into memory so new homes get a copy of it, owned by the
/// user, without any read happening after writing has begun.
struct SkeletonTree {
    enum Item {
        case directory(relative: String, permissions: UInt16)
        case file(relative: String, contents: [UInt8], permissions: UInt16)
        case symlink(relative: String, target: String)
    }

    var items: [Item] = []

    func contains(_ relative: String) -> Bool { item(relative) != nil }

    func item(_ relative: String) -> Item? {
        items.first {
            switch $0 {
            case .directory(let r, _), .file(let r, _, _), .symlink(let r, _): r == relative
            }
        }
    }

    static func read(from fs: Ext2Filesystem) throws(AccountsError) -> SkeletonTree {
        var tree = SkeletonTree()
        guard let root = try fs.lookup("/etc/skel") else { return tree }
        try tree.walk(fs, directory: root, relative: "", depth: 0)
        return tree
    }

    private mutating func walk(_ fs: Ext2Filesystem, directory: UInt32, relative: String, depth: Int) throws(AccountsError) {
        guard depth < 16 else {
            throw AccountsError(.filesystem, "/etc/skel in \(fs.source) is nested deeper than 16 levels")
        }
        for entry in try fs.entries(of: directory).sorted(by: { $0.name < $1.name }) {
            let path = relative.isEmpty ? entry.name : relative + "/" + entry.name
            let attributes = try fs.attributes(entry.ino)
            let permissions = attributes.mode & 0o7777
            switch attributes.mode & 0o170000 {
            case 0o040000:
                items.append(.directory(relative: path, permissions: permissions))
                try walk(fs, directory: entry.ino, relative: path, depth: depth + 1)
            case 0o100000:
                items.append(.file(relative: path, contents: try fs.readFile(entry.ino, path: "/etc/skel/" + path),
                                   permissions: permissions))
            case 0o120000:
                items.append(.symlink(relative: path, target: try fs.symlinkTarget(entry.ino, path: "/etc/skel/" + path)))
            default:
                continue // devices, FIFOs and sockets have no place in a home directory
            }
        }
    }

    func operations(into home: String, uid: UInt32, gid: UInt32) -> [InjectionPlan.Operation] {
        items.map {
            switch $0 {
            case .directory(let r, let p): .directory(path: home + "/" + r, permissions: p, uid: uid, gid: gid)
            case .file(let r, let c, let p): .file(path: home + "/" + r, contents: c, permissions: p, uid: uid, gid: gid)
            case .symlink(let r, let t): .symlink(path: home + "/" + r, target: t, uid: uid, gid: gid)
            }
        }
    }
}
