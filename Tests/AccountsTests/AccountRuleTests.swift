import Foundation
import Testing
@testable import Accounts
import TestSupport

/// The account-value rules live in one place (`UserSpec.check`): the profile parser, the
/// inventory and the injector all use it (issue 13, point 5). One test per rule here; the
/// profile's file:line mapping is tested in StationTests' UserValueCheckTests.
@Suite("Account value rules")
struct AccountRuleTests {
    static let hash = "$6$salt$" + String(repeating: "a", count: 86)

    @Test(arguments: [
        (UserSpec(name: "a:b", password: .locked), UserSpec.Problem.Field.name),
        (UserSpec(name: "lab\n", password: .locked), .name),
        (UserSpec(name: "lab", uid: 0, password: .locked), .uid),
        (UserSpec(name: "lab", uid: 100, password: .locked), .uid),
        (UserSpec(name: "lab", uid: 65534, password: .locked), .uid),
        (UserSpec(name: "lab", uid: 65535, password: .locked, allowSystemUID: true), .uid),
        (UserSpec(name: "lab", uid: 4_294_967_295, password: .locked, allowSystemUID: true), .uid),
        (UserSpec(name: "lab", groups: ["ok", "x:y"], password: .locked), .groups),
        (UserSpec(name: "lab", groups: ["ok\nroot"], password: .locked), .groups),
        (UserSpec(name: "lab", shell: "/bin/sh\n", password: .locked), .shell),
        (UserSpec(name: "lab", shell: "/bin/../sh", password: .locked), .shell),
        (UserSpec(name: "lab", gecos: "a\u{0}b", password: .locked), .gecos),
        (UserSpec(name: "lab", gecos: "a\nb", password: .locked), .gecos),
        (UserSpec(name: "lab", home: "/home/../../etc", password: .locked), .home),
        (UserSpec(name: "lab", home: "/home/lab\n", password: .locked), .home),
        (UserSpec(name: "lab", home: "/home/lab\u{7}", password: .locked), .home),
        (UserSpec(name: "lab", password: .hash(hash + "\n")), .password),
        (UserSpec(name: "lab", password: .hash("$6$sa:lt$" + String(repeating: "a", count: 86))), .password),
        (UserSpec(name: "lab", password: .locked, sshKeys: ["ssh-ed25519 AAAA a\nssh-rsa BBBB b"]), .sshKeys),
        (UserSpec(name: "lab", password: .locked, sshKeys: ["ssh-ed25519 AAAA a\u{0}"]), .sshKeys),
    ])
    func eachRuleNamesItsField(spec: UserSpec, field: UserSpec.Problem.Field) {
        let problems = spec.problems()
        #expect(problems.map(\.field) == [field], "\(problems)")
        // The message never carries the raw control character.
        #expect(!problems.contains { $0.message.unicodeScalars.contains { $0.value < 0x20 } }, "\(problems)")
    }

    @Test func reservedUIDsPassOnlyWhenAllowed() {
        for uid in [0, 1, 999, 61184, 65519, 65534] {
            #expect(UserSpec(name: "lab", uid: uid, password: .locked).problems().map(\.field) == [.uid], "\(uid)")
            #expect(UserSpec(name: "lab", uid: uid, password: .locked, allowSystemUID: true).problems().isEmpty, "\(uid)")
        }
        for uid in [1000, 60000, 61183, 65520, 65536, 4_294_967_294] {
            #expect(UserSpec(name: "lab", uid: uid, password: .locked).problems().isEmpty, "\(uid)")
        }
    }

    @Test func validateUsesTheHashCodeForHashes() {
        #expect { try UserSpec(name: "lab", password: .hash("hunter2")).validate() } throws: { error in
            (error as? AccountsError)?.code == .invalidHash
        }
        #expect { try UserSpec(name: "lab", home: "/x/../y", password: .locked).validate() } throws: { error in
            (error as? AccountsError)?.code == .invalidSpec && (error as? AccountsError)?.message.contains("user lab: home") == true
        }
    }

    /// The injector applies the same rules: a spec the config check refuses never reaches
    /// a filesystem, and the image stays byte-identical.
    @Test func injectorRefusesWhatTheConfigCheckRefuses() throws {
        let image = try DiskImage()
        let before = try sha256(image.path)
        for spec in [UserSpec(name: "lab", uid: 0, password: .locked),
                     UserSpec(name: "lab", home: "/home/../../etc", password: .locked),
                     UserSpec(name: "lab", gecos: "x\ny", password: .locked)] {
            let expected = spec.problems().first?.message
            #expect(expected != nil)
            #expect {
                _ = try Injector.inject(target: image.path, root: .partition(2), users: [spec])
            } throws: { error in
                guard let error = error as? AccountsError, let expected else { return false }
                return error.code == .invalidSpec && error.message.contains(expected)
            }
        }
        #expect(try sha256(image.path) == before)
    }
}

@Suite("The password export is checked before any card")
struct PasswordExportCheckTests {
    /// `check()` refuses what `append` would refuse, without creating the file.
    @Test func checkRefusesWhatAppendRefuses() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let user = InjectedUser(name: "lab", uid: 1000, gid: 1000, home: "/home/lab", shell: "/bin/sh", hash: "!",
                                generatedPassword: "secret", created: true, homeCreated: true, sshKeys: 0)
        let loose = try dir.write("loose.tsv", "", mode: 0o644)
        let target = try dir.write("target.tsv", "", mode: 0o600)
        try FileManager.default.createSymbolicLink(atPath: dir.file("link.tsv"), withDestinationPath: target)
        for path in [loose, dir.file("link.tsv"), dir.path, dir.file("missing/p.tsv")] {
            #expect(throws: AccountsError.self, "\(path)") { try PasswordExport(path: path).check() }
            #expect(throws: AccountsError.self, "\(path)") { try PasswordExport(path: path).append(unit: "u", users: [user]) }
        }
        let fresh = dir.file("fresh.tsv")
        try PasswordExport(path: fresh).check()
        #expect(!FileManager.default.fileExists(atPath: fresh), "check() creates nothing")
        try PasswordExport(path: target).check()
    }
}

@Suite("Inventory values are checked when it is read")
struct InventoryCheckTests {
    func refusal(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> AccountsError? {
        do {
            _ = try Inventory(toml: text, path: "inv.toml")
            Issue.record("expected the inventory to be refused", sourceLocation: sourceLocation)
        } catch {
            return error
        }
        return nil
    }

    @Test(arguments: [
        ("name_pattern = \"lab\"\n\u{0}[[users]]\nname = \"lab\"\npassword = \"locked\"\n", "inv.toml:2: contains a NUL byte"),
        ("[[users]]\nname = \"lab\"\npassword = \"locked\"\nhome = \"/home/lab\\u0000/../etc\"\n", "inv.toml:4: a \\u0000 escape"),
        ("[[users]]\nname = \"la\\nb\"\npassword = \"locked\"\n", "user la\\nb: name: \"la\\nb\" is not a valid name"),
        ("", "is empty"),
        ("  \n\n", "is empty"),
        ("nmae_pattern = \"x\"\n", "unknown key \"nmae_pattern\" in the top level"),
        ("[[users]]\nname = \"lab\"\npassword = \"locked\"\nshel = \"/bin/sh\"\n", "unknown key \"shel\" in [[users]] 1"),
        ("[serial.\"x\".users.lab]\npasword = \"locked\"\n", "unknown key \"pasword\""),
        ("[slot.\"a\"]\nnmae = \"x\"\n", "unknown key \"nmae\" in [slot.\"a\"]"),
        ("[[users]]\nname = \"lab\"\npassword = \"locked\"\nuid = 0\n", "second root account"),
        ("[[users]]\nname = \"lab\"\npassword = \"locked\"\n[[users]]\nname = \"lab\"\npassword = \"locked\"\n", "listed twice"),
        ("[[users]]\nname = \"lab\"\npassword = \"locked\"\n[serial.\"3a5f\".users.lab]\nhome = \"/home/../../etc\"\n",
         "[serial.\"3a5f\".users.lab]: user lab: home"),
        ("[seq.7.users.lab]\ngecos = \"a\\nb\"\npassword = \"locked\"\n", "[seq.\"7\".users.lab]: user lab: gecos"),
        ("[slot.\"a\".users.extra]\nshell = \"/bin/sh\"\n", "no override gives it a password"),
        ("name_pattern = \"lab/{seq}\"\n", "name_pattern \"lab/{seq}\" contains '/'"),
        ("name_pattern = \"lab\\t{seq}\"\n", "control character"),
        ("[serial.\"x\"]\nname = \"a\\nb\"\n", "[serial.\"x\"] name"),
        ("sha512_rounds = 10\n", "sha512_rounds must be between 1000"),
        ("hash = \"yescrypt\"\nyescrypt_cost = 12\n", "yescrypt_cost must be between 1 and 11"),
    ])
    func badValueIsRefusedAtLoad(text: String, reason: String) throws {
        let error = try #require(refusal(text))
        #expect(error.code == .inventory, "\(error)")
        #expect(error.message.contains(reason), "\(error.message)")
        #expect(!error.message.contains("\n"), "\(error.message)")
    }

    @Test func systemUIDAllowedExplicitlyAndPasswordFromAnotherLayer() throws {
        let inventory = try Inventory(toml: """
            [[users]]
            name = "admin"
            uid = 0
            allow_system_uid = true
            password = "locked"
            [slot."a".users.extra]
            password = "generate"
            [serial."s".users.extra]
            shell = "/bin/sh"
            """)
        #expect(inventory.users.first?.allowSystemUID == true)
        let unit = try inventory.assignment(serial: "s", slot: "a", sequence: 1)
        #expect(unit.users.map(\.name) == ["admin", "extra"])
        #expect(unit.users[1].shell == "/bin/sh")
    }
}
