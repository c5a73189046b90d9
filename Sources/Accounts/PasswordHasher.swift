import CCrypt
#if canImport(Glibc)
import Glibc
#endif

/// Which crypt method new hashes use.
public enum HashMethod: Sendable, Equatable {
    /// SHA-512 crypt, `$6$`, what `mkpasswd --method=SHA-512` makes. nil rounds = 5000,
    /// the default every libc accepts without a `rounds=` field.
    case sha512(rounds: Int?)
    /// yescrypt, `$y$`, Debian's default since 11. nil cost = libxcrypt's default (5).
    case yescrypt(cost: Int?)

    var prefix: String {
        switch self {
        case .sha512: "$6$"
        case .yescrypt: "$y$"
        }
    }

    var count: UInt {
        switch self {
        case .sha512(let rounds): UInt(rounds ?? 0)
        case .yescrypt(let cost): UInt(cost ?? 0)
        }
    }
}

/// Hashing through libxcrypt: `crypt_gensalt_rn` makes the setting (with NULL random
/// bytes it reads the kernel's random source itself), `crypt_r` hashes. Nothing here
/// keeps or logs the plaintext.
public enum PasswordHasher {
    /// Hashes `password` with a fresh random salt.
    public static func hash(_ password: String, method: HashMethod) throws(AccountsError) -> String {
        if case .sha512(let rounds?) = method, !(1000...999_999_999).contains(rounds) {
            throw AccountsError(.hashing, "SHA-512 rounds must be between 1000 and 999999999, not \(rounds)")
        }
        if case .yescrypt(let cost?) = method, !(1...11).contains(cost) {
            throw AccountsError(.hashing, "yescrypt cost must be between 1 and 11, not \(cost)")
        }
        var output = [CChar](repeating: 0, count: Int(CRYPT_GENSALT_OUTPUT_SIZE))
        let made = crypt_gensalt_rn(method.prefix, method.count, nil, 0, &output, Int32(output.count))
        guard made != nil else {
            throw AccountsError(.hashing,
                "libcrypt could not make a \(method.prefix) salt (errno \(errno)); is the method enabled in libxcrypt?")
        }
        let setting = String(decoding: output.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return try hash(password, setting: setting)
    }

    /// Hashes with a given setting (`$6$salt`, `$6$rounds=N$salt`, `$y$j9T$salt`, or a
    /// whole hash to verify against). Used for fixed-salt comparisons with peers.
    public static func hash(_ password: String, setting: String) throws(AccountsError) -> String {
        let data = UnsafeMutablePointer<crypt_data>.allocate(capacity: 1)
        // crypt_data holds intermediate state derived from the password: wipe it.
        data.initialize(to: crypt_data())
        defer {
            UnsafeMutableRawPointer(data).initializeMemory(as: UInt8.self, repeating: 0,
                                                           count: MemoryLayout<crypt_data>.size)
            data.deallocate()
        }
        guard let result = crypt_r(password, setting, data) else {
            throw AccountsError(.hashing, "libcrypt refused the setting \(setting.prefix(8))… (errno \(errno))")
        }
        let hashed = String(cString: result)
        // libxcrypt signals failure with a "*0"/"*1" token rather than NULL.
        guard !hashed.hasPrefix("*") else {
            throw AccountsError(.hashing, "libcrypt could not hash with setting \(setting.prefix(8))…: unsupported or malformed")
        }
        return hashed
    }

    /// Whether `password` matches `hash` (the way login checks it).
    public static func verify(_ password: String, against hash: String) -> Bool {
        guard let again = try? Self.hash(password, setting: hash) else { return false }
        // Constant-time compare: the hash is not secret, but habits matter.
        let a = Array(again.utf8), b = Array(hash.utf8)
        guard a.count == b.count else { return false }
        return zip(a, b).reduce(0) { $0 | ($1.0 ^ $1.1) } == 0
    }
}
