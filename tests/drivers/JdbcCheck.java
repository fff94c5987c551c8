// pgjdbc through pgtenant: PreparedStatements past prepareThreshold (the driver switches to
// named server statements S_n), explicit transactions (setAutoCommit(false)), the driver's
// startup parameters, and per-client settings. Run with the source launcher:
//   java -cp /usr/share/java/postgresql.jar tests/drivers/JdbcCheck.java

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;

public class JdbcCheck {
    static final int ROUNDS = 10;
    static final String QUERY =
        "SELECT current_setting('app.current_tenant_id'), count(*)::int, "
            + "current_setting('work_mem'), pg_backend_pid() FROM items WHERE ?::int >= 0";

    record Tenant(String name, String user, String password, String database, String id, int rows) {}

    static String workMemOf(int i) {
        return (1100 + i) + "kB";
    }

    static int check(int i, Tenant t, ResultSet rs) throws SQLException {
        if (!rs.next()) throw new AssertionError("client " + i + ": no row");
        String got = rs.getString(1) + "/" + rs.getInt(2) + "/" + rs.getString(3);
        String want = t.id() + "/" + t.rows() + "/" + workMemOf(i);
        if (!got.equals(want)) {
            throw new AssertionError("client " + i + " (" + t.name() + "): got " + got + ", want " + want);
        }
        return rs.getInt(4);
    }

    static void client(int i, int port, Tenant t, Set<Integer> pids) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", t.user());
        p.setProperty("password", t.password());
        p.setProperty("prepareThreshold", "3");
        String url = "jdbc:postgresql://127.0.0.1:" + port + "/" + t.database();
        try (Connection c = DriverManager.getConnection(url, p)) {
            try (Statement s = c.createStatement()) {
                s.execute("SET work_mem = '" + workMemOf(i) + "'");
            }
            try (PreparedStatement ps = c.prepareStatement(QUERY)) {
                for (int r = 0; r < ROUNDS; r++) {
                    ps.setInt(1, r);
                    try (ResultSet rs = ps.executeQuery()) {
                        pids.add(check(i, t, rs));
                    }
                }
                if (!ps.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare()) {
                    throw new AssertionError("client " + i + ": the driver never used a server-prepared statement");
                }
                c.setAutoCommit(false);
                for (int r = 0; r < ROUNDS; r++) {
                    ps.setInt(1, r);
                    try (ResultSet rs = ps.executeQuery()) {
                        pids.add(check(i, t, rs));
                    }
                    try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SHOW work_mem")) {
                        rs.next();
                        if (!rs.getString(1).equals(workMemOf(i))) {
                            throw new AssertionError("client " + i + ": SHOW work_mem is someone else's");
                        }
                    }
                    c.commit();
                }
                // An error mid-transaction, a rollback, and the prepared statement still works.
                try (Statement s = c.createStatement()) {
                    s.execute("SELECT 1/0");
                    throw new AssertionError("client " + i + ": division by zero not reported");
                } catch (SQLException e) {
                    if (!"22012".equals(e.getSQLState())) throw e;
                }
                c.rollback();
                ps.setInt(1, 0);
                try (ResultSet rs = ps.executeQuery()) {
                    pids.add(check(i, t, rs));
                }
                c.commit();
            }
        }
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(System.getenv("PGT_PORT"));
        String clientsEnv = System.getenv("PGT_CLIENTS");
        int clients = clientsEnv == null ? 50 : Integer.parseInt(clientsEnv);
        List<Tenant> tenants = new ArrayList<>();
        for (String e : System.getenv("PGT_TENANTS").split(";")) {
            if (e.isEmpty()) continue;
            String[] f = e.split("\\|");
            tenants.add(new Tenant(f[0], f[1], f[2], f[3], f[4], Integer.parseInt(f[5])));
        }
        Set<Integer> pids = ConcurrentHashMap.newKeySet();
        List<Throwable> failures = new ArrayList<>();
        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            final int n = i;
            Thread th = new Thread(() -> {
                try {
                    client(n, port, tenants.get(n % tenants.size()), pids);
                } catch (Throwable e) {
                    synchronized (failures) {
                        failures.add(e);
                    }
                }
            });
            th.start();
            threads.add(th);
        }
        for (Thread th : threads) th.join();
        if (!failures.isEmpty()) {
            System.err.println("FAILED: " + failures.size() + " clients; first: " + failures.get(0));
            failures.get(0).printStackTrace();
            System.exit(1);
        }
        System.out.println("pgjdbc " + org.postgresql.util.DriverInfo.DRIVER_VERSION + ": " + clients + " clients ok");
        System.out.println("pids=" + pids.size());
    }
}
