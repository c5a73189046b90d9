extension Profile {
    static let userKeys = ["name", "uid", "groups", "shell", "gecos", "home", "password", "hash", "ssh_keys"]

    /// The key types an authorized_keys line may carry (OpenSSH's list).
    static let sshKeyTypes: Set<String> = [
        "ssh-ed25519", "ssh-rsa", "ssh-dss", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
    ]

    static func parseUser(_ reader: TOMLTableReader) throws -> User {
        try reader.rejectUnknownKeys(userKeys)
        guard let name = try reader.string("name") else {
            throw reader.error("name", "missing: each [[users]] needs name = \"…\"")
        }
        // useradd's rule (NAME_REGEX default): a lower-case letter or _, then [a-z0-9_-], at most 32.
        let isValidName = name.count <= 32 && name.utf8.enumerated().allSatisfy { index, byte in
            let lower = byte >= 0x61 && byte <= 0x7A
            if index == 0 { return lower || byte == 0x5F }
            return lower || byte == 0x5F || byte == 0x2D || (byte >= 0x30 && byte <= 0x39)
        }
        guard !name.isEmpty, isValidName else {
            throw reader.error("name", "\"\(name)\" is not a valid user name (lower-case letter or _, then a-z 0-9 _ -, at most 32)")
        }
        let password: User.Password
        switch (try reader.string("password"), try reader.string("hash")) {
        case (.some, .some):
            throw reader.error("hash", "both password and hash are given; keep one")
        case (let mode?, nil):
            switch mode {
            case "generate": password = .generate
            case "locked": password = .locked
            default:
                throw reader.error("password", "expected \"generate\" or \"locked\", found \"\(mode)\" (a fixed password goes in as hash = \"$6$…\", made with mkpasswd --method=SHA-512)")
            }
        case (nil, let hash?):
            // crypt(3) hashes in the modular format: $id$…; a plaintext here would be a leak.
            let fields = hash.split(separator: "$", omittingEmptySubsequences: false)
            guard hash.hasPrefix("$"), fields.count >= 4, !fields[1].isEmpty, !hash.contains(":") else {
                throw reader.error("hash", "not a crypt hash (expected $id$salt$hash, e.g. from mkpasswd --method=SHA-512)")
            }
            password = .hash(hash)
        case (nil, nil):
            password = .generate
        }
        let keys = try reader.strings("ssh_keys") ?? []
        for (index, key) in keys.enumerated() {
            let fields = key.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
            guard let typeIndex = fields.firstIndex(where: sshKeyTypes.contains), typeIndex + 1 < fields.count,
                  !key.contains("\n") else {
                throw reader.document.error(at: reader.path("ssh_keys") + [.index(index)],
                                            "not an SSH public key line (expected e.g. \"ssh-ed25519 AAAA… comment\")")
            }
        }
        for key in ["shell", "home"] {
            if let path = try reader.string(key), !path.hasPrefix("/") {
                throw reader.error(key, "\"\(path)\" must be an absolute path")
            }
        }
        if let gecos = try reader.string("gecos"), gecos.contains(":") || gecos.contains("\n") {
            throw reader.error("gecos", "must not contain ':' or a newline (they would break /etc/passwd)")
        }
        let groups = try reader.strings("groups") ?? []
        return User(name: name, uid: try reader.integer("uid", in: 0...60_000), groups: groups,
                    shell: try reader.string("shell"), gecos: try reader.string("gecos"), home: try reader.string("home"),
                    password: password, sshKeys: keys, location: reader.document.location(of: reader.path))
    }
}
