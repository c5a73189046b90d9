import Testing
@testable import Accounts

@Suite("Account files: lossless parsing and rendering")
struct AccountFileTests {
    static let trickyPasswd = """
        # /etc/passwd with the things real systems carry
        root:x:0:0:root:/root:/bin/bash

        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
        # a comment between entries
        odd:x:1001:1001:Odd,Room 1,+1 555,:/home/odd:/bin/sh:extra:fields
        empty::1002:1002:::
        +@netgroup::::::
        -baduser::::::
        +
        """ // no trailing newline on purpose

    @Test func untouchedFilesRenderByteIdentical() throws {
        for (text, minimum) in [(Self.trickyPasswd, 7), (Self.trickyPasswd + "\n", 7),
                                ("root:*:19000:0:99999:7:::\n\n# end\r\n", 9),
                                ("sudo:x:27:alice,bob\nweird:x:9:a,,b:trailing\n", 4), ("", 4), ("\n\n", 4)] {
            let file = try ColonSeparatedFile(path: "/etc/test", text: text, minimumFields: minimum)
            #expect(file.rendered() == text)
        }
    }

    @Test func databaseRoundTripKeepsAllFourFilesIdentical() throws {
        let db = try AccountDatabase(passwd: Self.trickyPasswd, shadow: "root:!:19000::::::\n",
                                     group: "root:x:0:\n#c\n", gshadow: "root:*::\n")
        #expect(db.passwd.rendered() == Self.trickyPasswd)
        #expect(db.shadow.rendered() == "root:!:19000::::::\n")
        #expect(db.group.rendered() == "root:x:0:\n#c\n")
        #expect(db.gshadow?.rendered() == "root:*::\n")
    }

    @Test func tooFewFieldsNamesFileAndLine() {
        #expect {
            _ = try ColonSeparatedFile(path: "/etc/passwd", text: "root:x:0:0:root:/root:/bin/bash\n\nbroken:x:5\n", minimumFields: 7)
        } throws: { error in
            guard let e = error as? AccountsError else { return false }
            return e.code == .malformedFile && e.message.contains("/etc/passwd line 3")
        }
    }

    @Test func malformedShadowLineNeverEchoesTheHash() {
        let hash = "$6$abcdefgh$" + String(repeating: "Z", count: 86)
        #expect {
            _ = try AccountDatabase(passwd: "", shadow: "root:\(hash):19000\n", group: "", gshadow: nil)
        } throws: { error in
            guard let e = error as? AccountsError else { return false }
            return e.message.contains("/etc/shadow line 1") && !e.message.contains("abcdefgh")
        }
    }

    @Test func nonNumericUidIsMalformed() {
        #expect {
            _ = try AccountDatabase(passwd: "root:x:0:0::/root:/bin/sh\nbob:x:+7:100::/home/bob:/bin/sh\n",
                                    shadow: "", group: "", gshadow: nil)
        } throws: { error in
            ((error as? AccountsError)?.message.contains("/etc/passwd line 2: uid \"+7\"") == true)
        }
    }

    @Test func nonNumericShadowAgeIsMalformed() {
        #expect(throws: AccountsError.self) {
            _ = try AccountDatabase(passwd: "", shadow: "root:*:yesterday:0:99999:7:::\n", group: "", gshadow: nil)
        }
    }

    @Test func emptyFirstFieldIsMalformed() {
        #expect(throws: AccountsError.self) {
            _ = try ColonSeparatedFile(path: "/etc/group", text: ":x:5:\n", minimumFields: 4)
        }
    }

    @Test func loginDefsLimitsAndHomeModeAreRead() throws {
        let defs = try LoginDefs(text: "# c\nUID_MIN\t 5000\nUID_MAX 6000\nGID_MIN 7000\nHOME_MODE 0700\nPASS_MAX_DAYS 90\n")
        #expect(defs.uidMin == 5000 && defs.uidMax == 6000 && defs.gidMin == 7000 && defs.gidMax == 60000)
        #expect(defs.homeMode == 0o700 && defs.passMaxDays == 90)
        #expect(LoginDefs().uidMin == 1000 && LoginDefs().gidMin == 1000)
    }

    @Test func idsAboveTheLargestLinuxIdAreMalformed() {
        #expect {
            _ = try AccountDatabase(passwd: "root:x:0:0::/root:/bin/sh\npi:x:1000:4294967296::/home/pi:/bin/sh\n", shadow: "", group: "", gshadow: nil)
        } throws: { error in
            ((error as? AccountsError)?.message.contains("/etc/passwd line 2: gid 4294967296 is above 4294967294") == true)
        }
        #expect {
            _ = try AccountDatabase(passwd: "", shadow: "", group: "root:x:0:\nbig:x:4294967295:\n", gshadow: nil)
        } throws: { error in
            ((error as? AccountsError)?.message.contains("/etc/group line 2: gid 4294967295 is above") == true)
        }
        #expect(throws: AccountsError.self) {
            _ = try AccountDatabase(passwd: "x:x:99999999999999999999:0::/:/bin/sh\n", shadow: "", group: "", gshadow: nil)
        }
    }

    @Test func loginDefsIdLimitsStopAtTheLargestLinuxIdAndAgingTakesMinusOne() throws {
        let defs = try LoginDefs(text: "UID_MAX 9223372036854775807\nGID_MAX 5000000000\nPASS_MAX_DAYS -1\nPASS_WARN_AGE -1\n")
        #expect(defs.uidMax == 4_294_967_294 && defs.gidMax == 4_294_967_294)
        #expect(defs.passMaxDays == -1 && defs.passWarnAge == -1)
        #expect(throws: AccountsError.self) { _ = try LoginDefs(text: "PASS_MAX_DAYS -2\n") }
        #expect(throws: AccountsError.self) { _ = try LoginDefs(text: "UID_MAX -1\n") }
    }

    @Test func loginDefsWithNonNumericLimitIsAnError() {
        #expect { _ = try LoginDefs(text: "UID_MIN many\n") } throws: { error in
            ((error as? AccountsError)?.message.contains("/etc/login.defs line 1") == true)
        }
        #expect(throws: AccountsError.self) { _ = try LoginDefs(text: "UID_MIN 7000\nUID_MAX 6000\n") }
    }
}

@Suite("Round trip of this machine's own account files")
struct HostAccountFileTests {
    /// The Debian files this test runs on are real-world input: whatever they hold must
    /// come back byte for byte.
    @Test(arguments: [("/etc/passwd", 7), ("/etc/shadow", 9), ("/etc/group", 4), ("/etc/gshadow", 4),
                      ("/etc/passwd-", 7), ("/etc/group-", 4)])
    func hostFileRendersByteIdentical(path: String, minimumFields: Int) throws {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let file = try ColonSeparatedFile(path: path, text: text, minimumFields: minimumFields)
        #expect(file.rendered() == text)
        #expect(!file.records.isEmpty)
    }

    @Test func hostDatabaseAndLoginDefsParse() throws {
        func read(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }
        let defs = try LoginDefs(text: try read("/etc/login.defs"))
        let db = try AccountDatabase(passwd: try read("/etc/passwd"), shadow: try read("/etc/shadow"),
                                     group: try read("/etc/group"), gshadow: try read("/etc/gshadow"), loginDefs: defs)
        #expect(db.user(named: "root")?.uid == 0)
        #expect(db.group(named: "shadow") != nil)
        // The numbers the host's useradd would use come from the same file.
        let expectedMin = Int(try Shell.must(["awk", "$1==\"UID_MIN\"{print $2}", "/etc/login.defs"])
            .trimmingCharacters(in: .whitespacesAndNewlines)) ?? 1000
        #expect(defs.uidMin == expectedMin)
    }
}
