import Foundation
import Testing
@testable import Accounts
import TestSupport

/// What a login can verify, read from real binaries on this machine: Debian's static busybox
/// (its own crypt: no yescrypt) and the host's PAM login with libxcrypt (yescrypt included).
/// The boot test (IntegrationTests/BootTests) is the oracle that busybox login really behaves so.
@Suite("Login capabilities of an image")
struct LoginCapabilitiesTests {
    static func bytes(_ path: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path).resolvingSymlinksInPath()))
    }

    static var busybox: String { Command.resolve("busybox") ?? "/bin/busybox" }

    @Test func debianBusyboxLoginVerifiesShaCryptButNotYescrypt() throws {
        let found = LoginCapabilities.analyze(loginPath: "/bin/login", login: try Self.bytes(Self.busybox), libcrypt: nil, encryptMethod: "SHA512")
        #expect(found.methods == [.des, .md5, .sha256, .sha512])
        #expect(found.login?.hasPrefix("/bin/login → busybox (BusyBox v1.") == true, "\(found)")
        let sha512 = try Command.check(["mkpasswd", "-m", "sha-512", "--stdin"], input: "pw").stdout.trimmingCharacters(in: .newlines)
        let yescrypt = try Command.check(["mkpasswd", "-m", "yescrypt", "--stdin"], input: "pw").stdout.trimmingCharacters(in: .newlines)
        #expect(found.verdict(forHash: sha512) == .verifiable)
        #expect(found.verdict(forHash: "!" + sha512) == .verifiable, "a locked account has nothing to verify")
        guard case .notVerifiable(let reason) = found.verdict(forHash: yescrypt) else {
            Issue.record("busybox login was said to verify yescrypt: \(found)")
            return
        }
        #expect(reason.contains("cannot verify yescrypt ($y$)") && reason.contains("mkpasswd -m sha-512"), "\(reason)")
        #expect(found.description.contains("login.defs ENCRYPT_METHOD SHA512"))
    }

    @Test func pamLoginWithLibxcryptVerifiesYescrypt() throws {
        let login = try Self.bytes("/bin/login")
        let libcrypt = try Self.bytes("/lib/x86_64-linux-gnu/libcrypt.so.1")
        let found = LoginCapabilities.analyze(loginPath: "/bin/login", login: login,
                                              libcrypt: ("/lib/x86_64-linux-gnu/libcrypt.so.1", libcrypt), encryptMethod: "YESCRYPT")
        let methods = try #require(found.methods)
        #expect(methods.isSuperset(of: [.sha512, .yescrypt, .bcrypt]), "\(found)")
        #expect(found.evidence.contains("libcrypt.so.1"))
        #expect(found.verdict(for: .yescrypt) == .verifiable)
    }

    @Test("a dynamically linked busybox login with its own crypt, next to a libxcrypt that knows yescrypt (Buildroot on glibc >= 2.38), still cannot verify yescrypt")
    func dynamicBusyboxUsesItsOwnCrypt() throws {
        // Debian's busybox is static: the interpreter's path, as a dynamic build carries it
        // (PT_INTERP), makes it one for the analysis.
        let login = try Self.bytes(Self.busybox) + Array("/lib64/ld-linux-x86-64.so.2\u{0}".utf8)
        #expect(LoginCapabilities.isDynamic(login))
        let libcrypt = try Self.bytes("/lib/x86_64-linux-gnu/libcrypt.so.1")
        let found = LoginCapabilities.analyze(loginPath: "/bin/login", login: login,
                                              libcrypt: ("/lib/libcrypt.so.1", libcrypt), encryptMethod: nil)
        #expect(found.methods == [.des, .md5, .sha256, .sha512], "\(found)")
        #expect(found.evidence.contains("busybox's own crypt"), "\(found.evidence)")
        guard case .notVerifiable = found.verdict(for: .yescrypt) else {
            Issue.record("a busybox login with its own crypt was said to verify yescrypt: \(found)")
            return
        }
    }

    @Test func noCryptCodeMeansUnknownNotRefused() {
        let found = LoginCapabilities.analyze(loginPath: "/bin/login", login: Array("#!/bin/sh\nexec /bin/sh\n".utf8), libcrypt: nil, encryptMethod: nil)
        #expect(found.methods == nil)
        #expect(found.verdict(forHash: "$y$j9T$abc$" + String(repeating: "a", count: 43)) == .unknown)
        #expect(found.description.contains("which hashes it verifies is unknown"))
    }

    @Test func hashPrefixesNameTheirMethod() {
        #expect(LoginCapabilities.CryptMethod(hash: "$6$salt$x") == .sha512)
        #expect(LoginCapabilities.CryptMethod(hash: "$5$salt$x") == .sha256)
        #expect(LoginCapabilities.CryptMethod(hash: "$y$j9T$s$x") == .yescrypt)
        #expect(LoginCapabilities.CryptMethod(hash: "$gy$j9T$s$x") == .gostYescrypt)
        #expect(LoginCapabilities.CryptMethod(hash: "$2b$10$x") == .bcrypt)
        #expect(LoginCapabilities.CryptMethod(hash: "!$1$s$x") == .md5)
        #expect(LoginCapabilities.CryptMethod(hash: "$9$nope") == nil)
    }
}
