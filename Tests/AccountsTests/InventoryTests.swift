import Foundation
import Testing
@testable import Accounts
import TestSupport

@Suite("Inventory and the password export file")
struct InventoryTests {
    static let hash = "$6$fixedsalt$" + String(repeating: "a", count: 86)
    static let toml = """
        name_pattern = "lab-{seq:03}"
        password_export = "/var/lib/provision/passwords.tsv"
        hash = "yescrypt"

        [password_policy]
        length = 16
        alphabet = "abcdefghijkmnpqrstuvwxyz23456789"

        [[users]]
        name = "lab"
        groups = ["sudo", "dialout"]
        password = "generate"
        ssh_keys = ["ssh-ed25519 AAAAkey op@bench"]

        [[users]]
        name = "guest"
        password = "locked"

        [seq.7]
        name = "seven"

        [seq.7.users.guest]
        password = "\(hash)"

        [slot."usb-1.2"]
        name = "camera-{slot}"

        [serial."3a5f0c21"]
        name = "special-{serial}"

        [serial."3a5f0c21".users.lab]
        shell = "/bin/sh"
        groups = ["video"]

        [serial."3a5f0c21".users.extra]
        password = "locked"
        uid = 4000
        """

    @Test func defaultsApplyToAnyUnit() throws {
        let inventory = try Inventory(toml: Self.toml)
        #expect(inventory.hashMethod == .yescrypt(cost: nil))
        let unit = try inventory.assignment(serial: "ffff", slot: "usb-9", sequence: 12)
        #expect(unit.unitName == "lab-012")
        #expect(unit.users.map(\.name) == ["lab", "guest"])
        #expect(unit.users[0].password == .generate(PasswordPolicy(length: 16, alphabet: "abcdefghijkmnpqrstuvwxyz23456789")))
        #expect(unit.users[0].groups == ["sudo", "dialout"] && unit.users[0].sshKeys == ["ssh-ed25519 AAAAkey op@bench"])
        #expect(unit.users[1].password == .locked)
    }

    @Test func overridesStackFromSequenceToSlotToSerial() throws {
        let inventory = try Inventory(toml: Self.toml)
        let seven = try inventory.assignment(serial: nil, slot: nil, sequence: 7)
        #expect(seven.unitName == "seven" && seven.users[1].password == .hash(Self.hash))
        let camera = try inventory.assignment(serial: nil, slot: "usb-1.2", sequence: 7)
        #expect(camera.unitName == "camera-usb-1.2" && camera.users[1].password == .hash(Self.hash))
        let special = try inventory.assignment(serial: "3a5f0c21", slot: "usb-1.2", sequence: 1)
        #expect(special.unitName == "special-3a5f0c21")
        #expect(special.users.map(\.name) == ["lab", "guest", "extra"])
        // The override changes what it names and inherits the rest.
        #expect(special.users[0].shell == "/bin/sh" && special.users[0].groups == ["video"])
        #expect(special.users[0].sshKeys == ["ssh-ed25519 AAAAkey op@bench"])
        #expect(special.users[2].uid == 4000)
    }

    @Test func namePatternsAreExpanded() throws {
        #expect(try Inventory.format("lab-{seq:03}", sequence: 7, serial: "", slot: "", path: "t") == "lab-007")
        #expect(try Inventory.format("lab-{seq:02}", sequence: 1234, serial: "", slot: "", path: "t") == "lab-1234")
        #expect(try Inventory.format("{slot}/{serial}/{seq}", sequence: 3, serial: "S", slot: "A", path: "t") == "A/S/3")
        for bad in ["lab-{seq", "lab-{sequence}", "{seq:3}", "{seq:0}"] {
            #expect(throws: AccountsError.self) { try Inventory.format(bad, sequence: 1, serial: "", slot: "", path: "t") }
        }
    }

    @Test func badInventoriesAreRefusedWithTheReason() {
        let cases: [(String, String)] = [
            ("[[users]]\nname = \"lab\"\n", "needs a password"),
            ("[[users]]\nname = \"lab\"\npassword = \"hunter2\"\n", "not an accepted crypt hash"),
            ("[[users]]\npassword = \"locked\"\n", "has no name"),
            ("[[users]]\nname = \"Lab\"\npassword = \"locked\"\n", "not a valid name"),
            ("hash = \"md5\"\n", "not supported"),
            ("name_pattern = \"x-{nope}\"\n", "unknown placeholder"),
            ("[seq.first]\nname = \"a\"\n", "not a sequence number"),
            // A spelling the lookup by number would never find.
            ("[seq.\"007\"]\nname = \"a\"\n", "use [seq.\"7\"]"),
            ("[seq.\"+8\"]\nname = \"a\"\n", "use [seq.\"8\"]"),
            ("[password_policy]\nlength = 3\n", "length"),
            ("users = [ unclosed", "not a valid inventory"),
        ]
        for (text, reason) in cases {
            #expect(throws: AccountsError.self, "\(reason)") { _ = try Inventory(toml: text) }
            do { _ = try Inventory(toml: text) } catch { #expect(error.message.contains(reason), "\(error.message)") }
        }
    }

    @Test func exportFileIsCreated0600AndAppended() throws {
        let dir = try TemporaryDirectory()
        let path = dir.file("passwords.tsv")
        let export = PasswordExport(path: path)
        let user = InjectedUser(name: "lab", uid: 1000, gid: 1000, home: "/home/lab", shell: "/bin/sh", hash: "!",
                                generatedPassword: "pw-one", created: true, homeCreated: true, sshKeys: 0)
        var other = user
        other.name = "given"; other.generatedPassword = nil
        let date = Date(timeIntervalSince1970: 0)
        try export.append(unit: "lab-001", users: [user, other], at: date)
        var second = user
        second.generatedPassword = "pw-two"
        try export.append(unit: "lab-002", users: [second], at: date)
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect(attributes[.posixPermissions] as? Int == 0o600)
        #expect(try String(contentsOfFile: path, encoding: .utf8)
                == "1970-01-01T00:00:00Z\tlab-001\tlab\tpw-one\n1970-01-01T00:00:00Z\tlab-002\tlab\tpw-two\n")
    }

    @Test func exportRefusesLooseModesSymlinksAndDirectories() throws {
        let dir = try TemporaryDirectory()
        let user = InjectedUser(name: "lab", uid: 1000, gid: 1000, home: "/home/lab", shell: "/bin/sh", hash: "!",
                                generatedPassword: "secret", created: true, homeCreated: true, sshKeys: 0)
        let loose = try dir.write("loose.tsv", "", mode: 0o644)
        #expect { try PasswordExport(path: loose).append(unit: "u", users: [user]) }
            throws: { (($0 as? AccountsError)?.message.contains("mode 644") == true) }
        #expect(try String(contentsOfFile: loose, encoding: .utf8).isEmpty)
        let target = try dir.write("target.tsv", "", mode: 0o600)
        try FileManager.default.createSymbolicLink(atPath: dir.file("link.tsv"), withDestinationPath: target)
        #expect(throws: AccountsError.self) { try PasswordExport(path: dir.file("link.tsv")).append(unit: "u", users: [user]) }
        #expect(try String(contentsOfFile: target, encoding: .utf8).isEmpty)
        #expect(throws: AccountsError.self) { try PasswordExport(path: dir.path).append(unit: "u", users: [user]) }
        #expect(throws: AccountsError.self) { try PasswordExport(path: dir.file("t.tsv")).append(unit: "a\tb", users: [user]) }
    }
}

@Suite("Inventory files on disk")
struct InventoryFileTests {
    @Test func inventoryIsLoadedFromAFileAndMissingFilesAreNamed() throws {
        let dir = try TemporaryDirectory()
        let path = try dir.write("inventory.toml", InventoryTests.toml)
        let inventory = try Inventory.load(path: path)
        #expect(inventory.passwordExport == "/var/lib/provision/passwords.tsv")
        #expect(try inventory.assignment(serial: nil, slot: nil, sequence: 3).unitName == "lab-003")
        #expect { _ = try Inventory.load(path: dir.file("missing.toml")) }
            throws: { (($0 as? AccountsError)?.message.contains("missing.toml") == true) }
    }

    /// The example in INVENTORY.md is the format's documentation: it must parse.
    @Test func documentedExampleParses() throws {
        let doc = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/Accounts/INVENTORY.md")
        let text = try String(contentsOf: doc, encoding: .utf8)
        let toml = try #require(text.components(separatedBy: "```toml\n").dropFirst().first?.components(separatedBy: "```").first)
            .replacingOccurrences(of: "$6$fixedsalt$…", with: "$6$fixedsalt$" + String(repeating: "a", count: 86))
            .replacingOccurrences(of: "AAAA…", with: "AAAAkey")
        let inventory = try Inventory(toml: toml, path: "INVENTORY.md")
        let unit = try inventory.assignment(serial: "3a5f0c21", slot: nil, sequence: 1)
        #expect(unit.unitName == "bench-scope" && unit.users.map(\.name) == ["lab", "scope"])
    }
}
