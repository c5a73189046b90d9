import Foundation
import Testing
@testable import Accounts

@Suite("Password hashing through libcrypt, checked against mkpasswd, openssl and the host's crypt()")
struct HashingTests {
    static let passwords = ["correct horse battery staple", "pässwörd-ü", "x", "with:colon and $dollar"]

    /// The host's crypt(3) through perl, which links libcrypt: an independent verifier.
    static func hostCrypt(_ password: String, _ setting: String) throws -> String {
        let result = try Shell.run(["perl", "-e", "print crypt($ENV{PW}, $ENV{SETTING})"],
                                   environment: ["PW": password, "SETTING": setting])
        guard result.status == 0 else { throw FixtureError("perl crypt failed: \(result.stderr)") }
        return result.stdout
    }

    @Test(arguments: ["saltsalt", "./AZaz09", "0123456789abcdef"])
    func sha512ForAFixedSaltEqualsMkpasswdAndOpenSSL(salt: String) throws {
        for password in Self.passwords {
            let ours = try PasswordHasher.hash(password, setting: "$6$\(salt)")
            let mkpasswd = try Shell.must(["mkpasswd", "-m", "sha-512", "-S", salt, "--stdin"], stdin: password)
                .trimmingCharacters(in: .newlines)
            let openssl = try Shell.must(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], stdin: password)
                .trimmingCharacters(in: .newlines)
            #expect(ours == mkpasswd)
            #expect(ours == openssl)
            #expect(ours.hasPrefix("$6$\(salt)$") && ours.count == 3 + salt.count + 1 + 86)
        }
    }

    @Test func sha512WithRoundsEqualsMkpasswd() throws {
        let ours = try PasswordHasher.hash("secret", setting: "$6$rounds=10000$fixedsalt")
        let theirs = try Shell.must(["mkpasswd", "-m", "sha-512", "-R", "10000", "-S", "fixedsalt", "--stdin"], stdin: "secret")
        #expect(ours == theirs.trimmingCharacters(in: .newlines))
    }

    @Test(arguments: [HashMethod.sha512(rounds: nil), .sha512(rounds: 20000), .yescrypt(cost: nil), .yescrypt(cost: 3)])
    func hostCryptVerifiesOurRandomSaltedHashes(method: HashMethod) throws {
        for password in Self.passwords {
            let hash = try PasswordHasher.hash(password, method: method)
            #expect(hash.hasPrefix(method.prefix))
            try HashFormat.validate(hash)
            #expect(try Self.hostCrypt(password, hash) == hash)
            #expect(try Self.hostCrypt(password + "!", hash) != hash)
            #expect(PasswordHasher.verify(password, against: hash))
            #expect(!PasswordHasher.verify(password + " ", against: hash))
        }
        if case .sha512(let rounds?) = method {
            #expect(try PasswordHasher.hash("a", method: method).hasPrefix("$6$rounds=\(rounds)$"))
        }
    }

    @Test func yescryptHashMadeByMkpasswdVerifiesHere() throws {
        let theirs = try Shell.must(["mkpasswd", "-m", "yescrypt", "--stdin"], stdin: "lab password")
            .trimmingCharacters(in: .newlines)
        #expect(PasswordHasher.verify("lab password", against: theirs))
        #expect(!PasswordHasher.verify("lab passwort", against: theirs))
    }

    @Test func everySaltIsFresh() throws {
        let hashes = try (0..<32).map { _ in try PasswordHasher.hash("same", method: .sha512(rounds: nil)) }
        #expect(Set(hashes).count == 32)
        let salts = hashes.map { $0.split(separator: "$")[1] }
        #expect(salts.allSatisfy { $0.count == 16 })
    }

    @Test func outOfRangeCostsAreRefused() {
        #expect(throws: AccountsError.self) { try PasswordHasher.hash("a", method: .sha512(rounds: 10)) }
        #expect(throws: AccountsError.self) { try PasswordHasher.hash("a", method: .yescrypt(cost: 40)) }
        #expect(throws: AccountsError.self) { try PasswordHasher.hash("a", setting: "$9$nonsense") }
    }

    @Test func premadeHashesAreAcceptedOnlyInKnownFormats() throws {
        let sha512 = try PasswordHasher.hash("a", method: .sha512(rounds: nil))
        let yescrypt = try PasswordHasher.hash("a", method: .yescrypt(cost: nil))
        let sha256 = try Shell.must(["mkpasswd", "-m", "sha-256", "--stdin"], stdin: "a").trimmingCharacters(in: .newlines)
        let bcrypt = try Shell.must(["mkpasswd", "-m", "bcrypt", "--stdin"], stdin: "a").trimmingCharacters(in: .newlines)
        let rounds = try PasswordHasher.hash("a", method: .sha512(rounds: 6000))
        for good in [sha512, yescrypt, sha256, bcrypt, rounds, "!", "*", "!*", "!" + sha512] {
            #expect(throws: Never.self, "\(good.prefix(4)) should be accepted") { try HashFormat.validate(good) }
        }
        let md5 = try Shell.must(["openssl", "passwd", "-1", "-salt", "abc", "-stdin"], stdin: "a").trimmingCharacters(in: .newlines)
        for bad in ["", "hunter2", md5, String(sha512.dropLast()), sha512 + "x", "$6$salt$", "$y$j9T$$",
                    "$6$rounds=5$salt$" + String(repeating: "a", count: 86), "$6$bad salt$" + String(repeating: "a", count: 86),
                    "!!hunter2", "DES.hash1234"] {
            #expect(throws: AccountsError.self, "\(bad.prefix(6)) should be refused") { try HashFormat.validate(bad) }
        }
    }

    @Test func generatedPasswordsFollowThePolicy() throws {
        let policy = PasswordPolicy(length: 31, alphabet: "abcdefghij0123")
        let passwords = try (0..<50).map { _ in try policy.generate() }
        #expect(passwords.allSatisfy { $0.count == 31 && $0.allSatisfy { "abcdefghij0123".contains($0) } })
        #expect(Set(passwords).count == 50)
        // Every character of the alphabet shows up over 1550 draws: the draw is not stuck.
        #expect(Set(passwords.joined()).count == 14)
        let standard = try PasswordPolicy().generate()
        #expect(standard.count == 20 && !standard.contains(where: { "0O1lI".contains($0) }))
    }

    @Test func unusablePoliciesAreRefused() {
        for policy in [PasswordPolicy(length: 4), PasswordPolicy(length: 20, alphabet: "abc"),
                       PasswordPolicy(length: 20, alphabet: "abcdefghijj"), PasswordPolicy(length: 20, alphabet: "abcdefghij:"),
                       PasswordPolicy(length: 20, alphabet: "abcdefghij ")] {
            #expect(throws: AccountsError.self) { try policy.generate() }
        }
    }
}

@Suite("Secrets stay out of messages")
struct SecretHygieneTests {
    @Test func aPlaintextPastedAsHashIsNotEchoed() {
        for plaintext in ["Sup3rSecretPass", "$1$saltsalt$notreallyahash", "$6$secretvalue"] {
            do {
                try HashFormat.validate(plaintext)
                Issue.record("\(plaintext.count)-character value accepted")
            } catch {
                #expect(!error.message.contains("Sup3") && !error.message.contains("salt") && !error.message.contains("secret"),
                        "\(error.message)")
            }
        }
    }
}
