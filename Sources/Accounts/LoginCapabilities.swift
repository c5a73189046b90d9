#if canImport(Glibc)
import Glibc
#endif

/// Which password hashes a card's own login can check.
///
/// A hash the image cannot verify locks its user out for good, and nothing else notices:
/// the shadow file is well-formed, `e2fsck` is clean, the host's `crypt()` agrees with it.
/// Debian's busybox `login` (1.35) carries busybox's own crypt (DES, MD5, SHA-256, SHA-512),
/// so a yescrypt `$y$` hash, Debian's own default, is refused at the console forever.
///
/// What the image can verify is read from the code in it, never by running it (the image
/// may be another architecture, and running what a card carries would trust it): the
/// program behind `/bin/login` (busybox, or a PAM login whose `pam_unix` calls the image's
/// `libcrypt.so.1`) and the crypt code it carries, recognised by names every implementation
/// contains — `rounds=` in SHA-crypt (glibc, libxcrypt, busybox, musl), `yescrypt` in
/// libxcrypt's yescrypt, `$2b$` in bcrypt, `$gy$` in gost-yescrypt. No evidence is said so
/// (`methods == nil`), not guessed. `/etc/login.defs`' `ENCRYPT_METHOD` is reported beside:
/// it is what the unit's own `passwd` will write later.
public struct LoginCapabilities: Sendable, Equatable, CustomStringConvertible {
    public enum CryptMethod: String, Sendable, CaseIterable, Comparable {
        case des, md5, sha256, sha512, bcrypt, yescrypt, gostYescrypt

        /// The method a crypt hash was made with, from its prefix; nil for a locked or
        /// unknown field.
        public init?(hash: String) {
            let field = hash.hasPrefix("!") ? String(hash.dropFirst()) : hash
            switch true {
            case field.hasPrefix("$1$"): self = .md5
            case field.hasPrefix("$5$"): self = .sha256
            case field.hasPrefix("$6$"): self = .sha512
            case field.hasPrefix("$y$"): self = .yescrypt
            case field.hasPrefix("$gy$"): self = .gostYescrypt
            case field.hasPrefix("$2b$"), field.hasPrefix("$2a$"), field.hasPrefix("$2y$"): self = .bcrypt
            case field.count == 13 && !field.hasPrefix("$"): self = .des
            default: return nil
            }
        }

        public var name: String {
            switch self {
            case .des: "DES"
            case .md5: "MD5 ($1$)"
            case .sha256: "SHA-256 ($5$)"
            case .sha512: "SHA-512 ($6$)"
            case .bcrypt: "bcrypt ($2b$)"
            case .yescrypt: "yescrypt ($y$)"
            case .gostYescrypt: "gost-yescrypt ($gy$)"
            }
        }

        public static func < (a: Self, b: Self) -> Bool {
            allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
        }
    }

    /// What checks passwords at the console, e.g. `/bin/login → busybox (BusyBox v1.35.0)`;
    /// nil when the image has no login program.
    public var login: String?
    /// The methods that program can verify; nil when the image gave no evidence either way.
    public var methods: Set<CryptMethod>?
    /// Where `methods` comes from, for a person reading the report.
    public var evidence: String
    /// `/etc/login.defs` ENCRYPT_METHOD, as written there (SHA512, YESCRYPT, …).
    public var encryptMethod: String?

    public init(login: String?, methods: Set<CryptMethod>?, evidence: String, encryptMethod: String? = nil) {
        self.login = login; self.methods = methods; self.evidence = evidence; self.encryptMethod = encryptMethod
    }

    public var description: String {
        var text = "login: \(login ?? "none found")"
        if let methods {
            let known = methods.sorted().map(\.name).joined(separator: ", ")
            let missing = CryptMethod.allCases.filter { !methods.contains($0) && $0 != .gostYescrypt }.map(\.name)
            text += " verifies \(known.isEmpty ? "nothing" : known)"
            if !missing.isEmpty { text += ", not \(missing.joined(separator: " or "))" }
        } else {
            text += "; which hashes it verifies is unknown"
        }
        text += " (\(evidence))"
        if let encryptMethod { text += "; login.defs ENCRYPT_METHOD \(encryptMethod)" }
        return text
    }

    public enum Verdict: Sendable, Equatable {
        /// The login can check it (or the account is locked: nothing to check).
        case verifiable
        /// It cannot: the reason, naming the method and the login.
        case notVerifiable(String)
        /// No evidence either way.
        case unknown
    }

    /// Whether the image's login can check a shadow password field.
    public func verdict(forHash field: String) -> Verdict {
        if field.hasPrefix("!") || field.hasPrefix("*") || field.isEmpty { return .verifiable }
        guard let method = CryptMethod(hash: field) else { return .unknown }
        return verdict(for: method)
    }

    public func verdict(for method: CryptMethod) -> Verdict {
        guard let methods else { return .unknown }
        if methods.contains(method) { return .verifiable }
        return .notVerifiable("""
            the image's \(login ?? "login") cannot verify \(method.name) hashes (it verifies \
            \(methods.sorted().map(\.name).joined(separator: ", "))): the user could never log in \
            at the console; use \(methods.contains(.sha512) ? "a SHA-512 hash (mkpasswd -m sha-512), or hash = \"sha512\" in the inventory" : "a method it verifies")
            """)
    }

    /// The method a `HashMethod` makes.
    public static func method(of hashMethod: HashMethod) -> CryptMethod {
        switch hashMethod {
        case .sha512: .sha512
        case .yescrypt: .yescrypt
        }
    }

    // MARK: - Reading the image

    /// Inspects the root filesystem of `target` (a whole-disk image or block device), read-only.
    public static func inspect(target: String, root: RootLocator) throws(AccountsError) -> LoginCapabilities {
        let located = try PartitionLocator.locate(root, in: target)
        let fs = try Ext2Filesystem(path: target, offset: located.partition.start, writable: false)
        defer { fs.discard() }
        return try inspect(fs)
    }

    /// Where login programs live; the first one present is the console's.
    static let loginPaths = ["/bin/login", "/usr/bin/login", "/sbin/login", "/usr/sbin/login"]
    /// Where a dynamically linked login (or PAM's pam_unix) finds crypt(): libxcrypt, or
    /// glibc's own libcrypt before it.
    static let libcryptDirectories = ["/lib", "/usr/lib", "/lib64", "/usr/lib64"]

    static func inspect(_ fs: Ext2Filesystem) throws(AccountsError) -> LoginCapabilities {
        let encryptMethod = try fs.readFile("/etc/login.defs").flatMap { Self.encryptMethod(loginDefs: String(decoding: $0, as: UTF8.self)) }
        var found: (path: String, bytes: [UInt8])?
        for path in loginPaths {
            if let bytes = try fs.readFile(path) { found = (path, bytes); break }
        }
        guard let (path, binary) = found else {
            return LoginCapabilities(login: nil, methods: nil, evidence: "no \(loginPaths.joined(separator: ", ")) in the image", encryptMethod: encryptMethod)
        }
        var libcrypt: (path: String, bytes: [UInt8])?
        if Self.isDynamic(binary) || !Self.isBusybox(binary) {
            libcrypt = try findLibcrypt(fs)
        }
        return analyze(loginPath: path, login: binary, libcrypt: libcrypt, encryptMethod: encryptMethod)
    }

    /// The decision, from the bytes: kept apart from the filesystem so it can be tested on
    /// any binary.
    static func analyze(loginPath: String, login binary: [UInt8], libcrypt: (path: String, bytes: [UInt8])?,
                        encryptMethod: String?) -> LoginCapabilities {
        let version = busyboxVersion(binary)
        let program = version.map { "\(loginPath) → busybox (\($0))" } ?? loginPath
        // Code in the login binary itself: busybox's own crypt, or a statically linked libcrypt.
        let own = Self.methods(inCode: binary)
        // A dynamically linked login, or a PAM login (shadow, util-linux) whose pam_unix
        // calls the system's libcrypt.
        let shared = libcrypt.flatMap { Self.methods(inCode: $0.bytes) }
        let evidence: String
        var verifiable: Set<CryptMethod>?
        switch (own, shared) {
        case (let a?, _?) where version != nil:
            // Busybox with its own crypt (CONFIG_USE_BB_CRYPT, the default) verifies with that
            // alone, dynamically linked or not: a libcrypt next to it (Buildroot adds libxcrypt
            // for glibc >= 2.38) is not what its login calls.
            verifiable = a
            evidence = "busybox's own crypt in \(loginPath) (it does not use \(libcrypt!.path))"
        case (let a?, let b?):
            verifiable = a.union(b)
            evidence = "crypt code in \(loginPath) and in \(libcrypt!.path)"
        case (let a?, nil):
            verifiable = a
            evidence = version != nil && !isDynamic(binary) ? "busybox's own crypt, linked into \(loginPath)" : "crypt code in \(loginPath)"
        case (nil, let b?):
            verifiable = b
            evidence = "\(libcrypt!.path), which \(loginPath) uses"
        case (nil, nil):
            evidence = libcrypt == nil ? "no crypt code found in \(loginPath) and no libcrypt.so.1 in the image"
                                       : "no crypt code recognised in \(loginPath) or \(libcrypt!.path)"
        }
        return LoginCapabilities(login: program, methods: verifiable, evidence: evidence, encryptMethod: encryptMethod)
    }

    /// The crypt methods a piece of code implements, by the names each implementation
    /// carries; nil when it carries none (no crypt code in it).
    static func methods(inCode bytes: [UInt8]) -> Set<CryptMethod>? {
        let sha = contains(bytes, "rounds=")
        let yescrypt = contains(bytes, "yescrypt")
        let bcrypt = contains(bytes, "$2b$")
        guard sha || yescrypt || bcrypt else { return nil }
        // Every implementation with SHA-crypt also has the older methods; libxcrypt can be
        // built without them, but then it also lacks the names tested here for them.
        var methods: Set<CryptMethod> = [.des, .md5]
        if sha { methods.formUnion([.sha256, .sha512]) }
        if yescrypt { methods.insert(.yescrypt) }
        if bcrypt { methods.insert(.bcrypt) }
        if contains(bytes, "$gy$") { methods.insert(.gostYescrypt) }
        return methods
    }

    static func isBusybox(_ bytes: [UInt8]) -> Bool { busyboxVersion(bytes) != nil }

    /// "BusyBox v1.35.0" from the binary's banner.
    static func busyboxVersion(_ bytes: [UInt8]) -> String? {
        guard let start = find(bytes, "BusyBox v") else { return nil }
        var end = start + 9
        while end < bytes.count, (bytes[end] >= 0x30 && bytes[end] <= 0x39) || bytes[end] == 0x2E { end += 1 }
        return end > start + 9 ? String(decoding: bytes[start..<end], as: UTF8.self) : nil
    }

    /// An ELF program interpreter (glibc's or musl's dynamic loader) means shared libraries.
    static func isDynamic(_ bytes: [UInt8]) -> Bool {
        contains(bytes, "/ld-linux") || contains(bytes, "/ld-musl") || contains(bytes, "/ld64.so")
    }

    static func findLibcrypt(_ fs: Ext2Filesystem) throws(AccountsError) -> (path: String, bytes: [UInt8])? {
        for directory in libcryptDirectories {
            if let bytes = try fs.readFile(directory + "/libcrypt.so.1") { return (directory + "/libcrypt.so.1", bytes) }
            // Debian's multiarch directories: /lib/x86_64-linux-gnu, /usr/lib/arm-linux-gnueabihf, …
            guard let ino = try fs.lookup(directory) else { continue }
            for entry in try fs.entries(of: ino) where entry.name.hasSuffix("-linux-gnu") || entry.name.hasSuffix("-linux-gnueabihf") || entry.name.hasSuffix("-linux-gnueabi") {
                let path = "\(directory)/\(entry.name)/libcrypt.so.1"
                if let bytes = try fs.readFile(path) { return (path, bytes) }
            }
        }
        return nil
    }

    static func encryptMethod(loginDefs text: String) -> String? {
        for raw in text.split(separator: "\n") {
            let fields = raw.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if fields.count >= 2, fields[0] == "ENCRYPT_METHOD" { return String(fields[1]) }
        }
        return nil
    }

    static func contains(_ bytes: [UInt8], _ text: String) -> Bool { find(bytes, text) != nil }

    static func find(_ bytes: [UInt8], _ text: String) -> Int? {
        let needle = Array(text.utf8)
        guard let first = needle.first, bytes.count >= needle.count else { return nil }
        return bytes.withUnsafeBufferPointer { haystack -> Int? in
            var i = 0
            let last = haystack.count - needle.count
            while i <= last {
                // memchr for the first byte, then compare the rest.
                guard let hit = memchr(haystack.baseAddress! + i, Int32(first), last - i + 1) else { return nil }
                let at = haystack.baseAddress!.distance(to: hit.assumingMemoryBound(to: UInt8.self))
                if memcmp(haystack.baseAddress! + at, needle, needle.count) == 0 { return at }
                i = at + 1
            }
            return nil
        }
    }
}
