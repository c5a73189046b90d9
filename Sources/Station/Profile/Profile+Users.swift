import Accounts

extension Profile {
    static let userKeys = ["name", "uid", "groups", "shell", "gecos", "home", "password", "hash", "ssh_keys",
                           "allow_system_uid"]

    static func parseUser(_ reader: TOMLTableReader) throws -> User {
        try reader.rejectUnknownKeys(userKeys)
        guard let name = try reader.string("name") else {
            throw reader.error("name", "missing: each [[users]] needs name = \"…\"")
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
                // Not echoed: a plaintext password typed here must not reach a log.
                throw reader.error("password", "expected \"generate\" or \"locked\" (a fixed password goes in as hash = \"$6$…\", made with mkpasswd --method=SHA-512)")
            }
        case (nil, let hash?):
            password = .hash(hash)
        case (nil, nil):
            password = .generate
        }
        let user = User(name: name, uid: try reader.integer("uid"), groups: try reader.strings("groups") ?? [],
                        shell: try reader.string("shell"), gecos: try reader.string("gecos"), home: try reader.string("home"),
                        password: password, sshKeys: try reader.strings("ssh_keys") ?? [],
                        allowSystemUID: try reader.bool("allow_system_uid") ?? false,
                        location: reader.document.location(of: reader.path))
        // The injector's own rules (UserSpec), so what passes here cannot fail there for its form.
        do throws(UserSpec.Problem) { try user.userSpec.check() } catch {
            let key = error.field == .password ? "hash" : error.field.rawValue
            let element: [TOMLKeyLocator.Segment] = error.index.map { [.index($0)] } ?? []
            let path = reader.path(key) + element
            throw reader.document.error(at: path, error.message)
        }
        return user
    }
}

extension Profile.User {
    /// What the injector gets for this user. Every caller converts through here, so a
    /// setting such as `allow_system_uid` cannot be dropped on the way.
    public var userSpec: UserSpec {
        let source: PasswordSource = switch password {
        case .generate: .generate(PasswordPolicy())
        case .locked: .locked
        case .hash(let hash): .hash(hash)
        }
        return UserSpec(name: name, uid: uid, groups: groups, shell: shell, gecos: gecos, home: home,
                        password: source, sshKeys: sshKeys, allowSystemUID: allowSystemUID)
    }
}
